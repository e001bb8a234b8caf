"""verger-maeclip: MAE + CLIP image-text pretraining as a plug-in for open_clip.

Reproduces, in miniature, "Masked Autoencoding Does Not Help Natural Language Supervision at
Scale" (Weers et al., CVPR 2023, arXiv 2301.07836): CLIP's contrastive loss and MAE's masked
pixel reconstruction on one shared open_clip ViT encoder, and the CLIP / MAE / MAE+CLIP
comparison.

>>> from verger.maeclip import MAECLIP, MAECLIPConfig, CaptionTokenizer
>>> model = MAECLIP(MAECLIPConfig(model_name="maeclip-tiny"))
>>> out = model(images, CaptionTokenizer.for_model("maeclip-tiny")(captions))
>>> out.loss.backward()
"""

from verger.core import package_version
from verger.maeclip.data import (
    CsvImageText,
    ImageTextCollate,
    ImageTextSet,
    WebDatasetShards,
    emoji_pairs,
    mnist_pairs,
    train_test_split,
    write_webdataset_shards,
)
from verger.maeclip.evaluate import (
    linear_probe_accuracy,
    recall_at_k,
    retrieval_recall,
    zero_shot_accuracy,
    zero_shot_classifier,
)
from verger.maeclip.experiment import VARIANTS, run_comparison, variant_config
from verger.maeclip.masking import Masking, num_kept, patchify, random_masking, unpatchify
from verger.maeclip.model import (
    MAECLIP,
    MAECLIPConfig,
    MAECLIPOutput,
    MAEDecoder,
    build_model,
    mae_loss,
)
from verger.maeclip.towers import CaptionTokenizer, create_clip, register_model_configs
from verger.maeclip.train import TrainBatches, TrainConfig, TrainResult, load_finished, train

__version__ = package_version("verger-maeclip")

__all__ = [
    "MAECLIP",
    "VARIANTS",
    "CaptionTokenizer",
    "CsvImageText",
    "ImageTextCollate",
    "ImageTextSet",
    "MAECLIPConfig",
    "MAECLIPOutput",
    "MAEDecoder",
    "Masking",
    "TrainBatches",
    "TrainConfig",
    "TrainResult",
    "WebDatasetShards",
    "__version__",
    "build_model",
    "create_clip",
    "emoji_pairs",
    "linear_probe_accuracy",
    "load_finished",
    "mae_loss",
    "mnist_pairs",
    "num_kept",
    "patchify",
    "random_masking",
    "recall_at_k",
    "register_model_configs",
    "retrieval_recall",
    "run_comparison",
    "train",
    "train_test_split",
    "unpatchify",
    "variant_config",
    "write_webdataset_shards",
    "zero_shot_accuracy",
    "zero_shot_classifier",
]
