"""The HTTP API: thin routes over ``db`` queries; work is published by task name."""
