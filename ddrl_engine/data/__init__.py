"""Data: the Dataset the trainer sees, the default digits set, a generic folder loader, the resumable
batch stream, and the engine's own digits classifier (shared by rewards and monitors)."""

from .captioned import CaptionedLatents, LatentCache, VideoDecodingUnavailable, load_image, load_video, read_captioned
from .dataset import Dataset
from .digits import DIGITS_NUM_CLASSES, DIGITS_SAMPLE_SHAPE, DigitsSplit, digits_split, load_digits_tensors
from .digits_classifier import (
    DigitsClassifier,
    DigitsClassifierConfig,
    default_cache_dir,
    load_or_train_digits_classifier,
    train_digits_classifier,
)
from .embedding_cache import CacheReport, PromptBank, PromptCache
from .folder import FolderDataset, load_folder
from .loader import DataStream
from .prompts import read_prompts

__all__ = [
    "DIGITS_NUM_CLASSES",
    "DIGITS_SAMPLE_SHAPE",
    "DataStream",
    "Dataset",
    "DigitsClassifier",
    "DigitsClassifierConfig",
    "DigitsSplit",
    "FolderDataset",
    "default_cache_dir",
    "digits_split",
    "load_digits_tensors",
    "load_folder",
    "load_or_train_digits_classifier",
    "train_digits_classifier",
    "CacheReport",
    "CaptionedLatents",
    "LatentCache",
    "PromptBank",
    "PromptCache",
    "VideoDecodingUnavailable",
    "load_image",
    "load_video",
    "read_captioned",
    "read_prompts",
]
