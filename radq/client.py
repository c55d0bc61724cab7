"""A small HTTP client for the radq API, used by the CLI."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, cast

import httpx

from radq.errors import RadqError
from radq.tar_reader import TarReader

MAX_PARTS = 256
"""Above this many files, the CLI uploads one tar archive instead of one part per file."""


class ApiError(RadqError):
    """Raised when the API answers with an error or cannot be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def expand_paths(paths: Sequence[Path]) -> list[tuple[str, Path]]:
    """Files to upload as ``(name shown in radq, local path)``; folders are walked recursively."""
    files: list[tuple[str, Path]] = []
    for path in paths:
        if path.is_dir():
            files.extend((str(p.relative_to(path.parent)), p) for p in _walk(path))
        elif path.is_file():
            files.append((path.name, path))
        else:
            raise ApiError(f"{path}: no such file or directory")
    return files


class Client:
    """The API over HTTP; ``token`` (RADQ_API_TOKEN for the CLI) is sent as a bearer token."""

    def __init__(self, base_url: str, timeout: float = 600.0, token: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self.http = httpx.Client(base_url=base_url, timeout=timeout, headers=headers)

    def close(self) -> None:
        self.http.close()

    def _request(self, method: str, url: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise ApiError(f"cannot reach the radq API at {self.http.base_url}: {exc}") from None
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            if response.status_code == 401:
                detail = f"{detail}; the CLI sends the token in RADQ_API_TOKEN"
            raise ApiError(f"{response.status_code}: {detail}", response.status_code)
        return response.json()

    def upload(
        self, paths: Sequence[Path], models: Sequence[str] = (), explain_threshold: float | None = None,
        **options: str | bool | None,
    ) -> dict[str, Any]:  # fmt: skip
        """Upload files, folders and archives as one job.

        ``options``: ``priority``, ``webhook_url``, ``force`` (see the API).
        """
        files = expand_paths(paths)
        if not files:
            raise ApiError("nothing to submit: the given folders are empty")
        data: dict[str, Any] = {"models": list(models)} if models else {}
        if explain_threshold is not None:
            data["explain_threshold"] = str(explain_threshold)
        for key, value in options.items():
            if value is not None:
                data[key] = str(value).lower() if isinstance(value, bool) else value
        with contextlib.ExitStack() as stack:
            parts: list[tuple[str, tuple[str, IO[bytes], str]]]
            if len(files) > MAX_PARTS:  # one tar, made as it is sent (the API expands it as it arrives)
                tar = cast(IO[bytes], TarReader(files))  # read-only: httpx only calls read()
                parts = [("files", ("submission.tar", tar, "application/x-tar"))]
            else:
                parts = [
                    ("files", (name, stack.enter_context(path.open("rb")), "application/octet-stream"))
                    for name, path in files
                ]
            return self._request("POST", "/v1/jobs", files=parts, data=data or None)  # type: ignore[no-any-return]

    def submit_paths(
        self, paths: Sequence[str], models: Sequence[str] = (), explain_threshold: float | None = None,
        **options: str | bool | None,
    ) -> dict[str, Any]:  # fmt: skip
        """Ask the server to read files in place (under its RADQ_ALLOWED_ROOTS)."""
        body: dict[str, Any] = {"paths": list(paths), "models": list(models)}
        body["explain_threshold"] = explain_threshold
        body.update({k: v for k, v in options.items() if v is not None})
        return self._request("POST", "/v1/jobs", json=body)  # type: ignore[no-any-return]

    def job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}")  # type: ignore[no-any-return]

    def jobs(
        self, *, status: str | None = None, since: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit, "status": status, "since": since}
        found = self._request("GET", "/v1/jobs", params={k: v for k, v in params.items() if v is not None})
        return found["items"]  # type: ignore[no-any-return]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel")  # type: ignore[no-any-return]

    def retry(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/jobs/{job_id}/retry")  # type: ignore[no-any-return]

    def instances(self, job_id: str, status: str | None = None) -> list[dict[str, Any]]:
        params = {"status": status} if status else {}
        return self._request("GET", f"/v1/jobs/{job_id}/instances", params=params)["items"]  # type: ignore[no-any-return]

    def study_results(self, study_uid: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/studies/{study_uid}/results")  # type: ignore[no-any-return]

    def health(self) -> dict[str, Any]:
        try:
            response = self.http.get("/healthz", timeout=5)
        except httpx.TransportError as exc:
            raise ApiError(f"cannot reach the radq API at {self.http.base_url}: {exc}") from None
        return response.json()  # type: ignore[no-any-return]
