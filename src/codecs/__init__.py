"""Learned codecs, one file per family, all honouring `src.codecs.base.Codec`."""

from src.codecs.base import Codec, CodecOutput, Encoded

__all__ = ["Codec", "CodecOutput", "Encoded"]
