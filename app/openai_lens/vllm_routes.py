"""vLLM's runtime adapter routes and tokenizer routes (being written)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
