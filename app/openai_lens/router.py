"""`/v1/models`, `/v1/completions`, `/v1/chat/completions` (being written)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
