"""Data: the on-disk format (format.py), image decoding (decode.py), batches (loader.py)."""
from courier_fast.data.decode import DecodeError, ImageDecoder, dali_available
from courier_fast.data.format import load_dataset, read_items, read_sessions, write_table
from courier_fast.data.loader import SessionBatch, SessionLoader

__all__ = ["DecodeError", "ImageDecoder", "dali_available", "load_dataset", "read_items",
           "read_sessions", "write_table", "SessionBatch", "SessionLoader"]
