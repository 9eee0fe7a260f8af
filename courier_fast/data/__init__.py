"""Data: the on-disk format (format.py) and image decoding (decode.py)."""
from courier_fast.data.decode import DecodeError, ImageDecoder, dali_available
from courier_fast.data.format import load_dataset, read_items, read_sessions, write_table

__all__ = ["DecodeError", "ImageDecoder", "dali_available", "load_dataset", "read_items",
           "read_sessions", "write_table"]
