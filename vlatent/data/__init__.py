"""Interleaved text / image / latent data: the record schema and its validation, chat rendering, the collator."""

from .chat import INLINE_IMAGE, render_chat, render_prompt
from .collator import InterleavedCollator
from .records import RecordError, load_records, present, validate_record, write_view

__all__ = ["INLINE_IMAGE", "InterleavedCollator", "RecordError", "load_records", "present", "render_chat", "render_prompt",
           "validate_record", "write_view"]
