"""Data: image decoding (DALI / torchvision / PIL)."""
from courier_fast.data.decode import DecodeError, ImageDecoder, dali_available

__all__ = ["DecodeError", "ImageDecoder", "dali_available"]
