"""job options and Grad-CAM saliency per result

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("options", sa.JSON(), nullable=True))
    with op.batch_alter_table("results") as batch_op:
        batch_op.add_column(sa.Column("saliency", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("results") as batch_op:
        batch_op.drop_column("saliency")
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("options")
