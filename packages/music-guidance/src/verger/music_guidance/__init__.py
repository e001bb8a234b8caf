"""verger-music-guidance: music production with one audio diffusion model and guidance gradients.

Levy et al., "Controllable Music Production with Diffusion Models and Guidance Gradients"
(arXiv 2311.00613): an unconditional v-prediction diffusion model on audio (waveform U-Net
or autoencoder latents), and every task (continuation, infilling, regeneration, transitions,
style) done at sampling time by the gradient of a task loss of the denoised estimate.

>>> from verger.music_guidance import AudioDiffusion, DiffusionConfig, SamplerSettings, sample
>>> model = AudioDiffusion(DiffusionConfig.tiny())
>>> audio = sample(model, batch_size=1, settings=SamplerSettings(steps=2))
"""

from verger.core.runtime import package_version
from verger.music_guidance.audio import (
    Audio,
    AudioFileError,
    SampleRateMismatchError,
    log_mel,
    read_audio,
    resample,
    write_wav,
)
from verger.music_guidance.autoencoder import AudioAutoencoder, AutoencoderConfig
from verger.music_guidance.classifier import (
    AudioClassifier,
    ClassifierConfig,
    load_classifier,
    train_classifier,
)
from verger.music_guidance.dit import DiT1D, DiTConfig
from verger.music_guidance.embedded import (
    COLLECTIONS,
    ClipSet,
    DataCacheError,
    EmbeddedDataConfig,
    load_embedded,
)
from verger.music_guidance.folder import AudioFolder, collect_clips, read_track_labels
from verger.music_guidance.guidance import (
    AudioEmbedder,
    ClassifierLoss,
    DenseObservation,
    EmbeddingL2,
    Guidance,
    LinearObservation,
    MaskedL1,
    MaskObservation,
)
from verger.music_guidance.metrics import (
    classifier_kl,
    embedding_stats,
    fad,
    frechet_distance,
    mel_distance,
    seam_mel_distance,
    seam_mel_windows,
)
from verger.music_guidance.model import AudioDiffusion, DiffusionConfig, load_diffusion
from verger.music_guidance.sampling import (
    SamplerSettings,
    ddim_invert,
    denoise,
    denoise_step,
    guidance_gradient,
    sample,
)
from verger.music_guidance.schedule import (
    CosineSchedule,
    DiscreteSchedule,
    eps_from_v,
    v_target,
    x0_from_v,
)
from verger.music_guidance.synth import TIMBRES, NoteEvent, Timbre, render_notes
from verger.music_guidance.tasks import (
    Task,
    constant_power_gains,
    continuation,
    crossfade,
    infill,
    regenerate,
    run_task,
    style_classifier,
    style_embedding,
    transition,
)
from verger.music_guidance.training import (
    EMA,
    ClipSampler,
    TrainConfig,
    train_autoencoder,
    train_diffusion,
)
from verger.music_guidance.unet import FrameFold, UNet1D, UNetConfig
from verger.music_guidance.zoo import Assets, AssetSpec, prepare_assets

__version__ = package_version("verger-music-guidance")

__all__ = [
    "COLLECTIONS",
    "EMA",
    "TIMBRES",
    "AssetSpec",
    "Assets",
    "Audio",
    "AudioAutoencoder",
    "AudioClassifier",
    "AudioDiffusion",
    "AudioEmbedder",
    "AudioFileError",
    "AudioFolder",
    "AutoencoderConfig",
    "ClassifierConfig",
    "ClassifierLoss",
    "ClipSampler",
    "ClipSet",
    "CosineSchedule",
    "DataCacheError",
    "DenseObservation",
    "DiT1D",
    "DiTConfig",
    "DiffusionConfig",
    "DiscreteSchedule",
    "EmbeddedDataConfig",
    "EmbeddingL2",
    "FrameFold",
    "Guidance",
    "LinearObservation",
    "MaskObservation",
    "MaskedL1",
    "NoteEvent",
    "SampleRateMismatchError",
    "SamplerSettings",
    "Task",
    "Timbre",
    "TrainConfig",
    "UNet1D",
    "UNetConfig",
    "__version__",
    "classifier_kl",
    "collect_clips",
    "constant_power_gains",
    "continuation",
    "crossfade",
    "ddim_invert",
    "denoise",
    "denoise_step",
    "embedding_stats",
    "eps_from_v",
    "fad",
    "frechet_distance",
    "guidance_gradient",
    "infill",
    "load_classifier",
    "load_diffusion",
    "load_embedded",
    "log_mel",
    "mel_distance",
    "prepare_assets",
    "read_audio",
    "read_track_labels",
    "regenerate",
    "render_notes",
    "resample",
    "run_task",
    "sample",
    "seam_mel_distance",
    "seam_mel_windows",
    "style_classifier",
    "style_embedding",
    "train_autoencoder",
    "train_classifier",
    "train_diffusion",
    "transition",
    "v_target",
    "write_wav",
    "x0_from_v",
]
