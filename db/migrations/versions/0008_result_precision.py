"""results.precision: the arithmetic of the forward pass (fp32, bf16, fp16)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 03:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Earlier rows stay NULL: whether they ran fp32 or under autocast was not recorded.
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.add_column(sa.Column("precision", sa.String(length=8), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.drop_column("precision")
