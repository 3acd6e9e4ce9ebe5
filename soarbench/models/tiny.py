"""The tiny SD3: diffusers' SD3 architecture with a config small enough to train on a laptop CPU.

Every part is the real class (SD3Transformer2DModel, AutoencoderKL, two CLIPTextModelWithProjection, CLIP's real
BPE tokenizer, FlowMatchEulerDiscreteScheduler with shift 3). It is saved with `save_pretrained` as a standard
StableDiffusion3Pipeline folder without the T5 encoder, so the loader that reads SD3.5-Medium reads it too.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class TinySD3Config:
    image_size: int = 32
    vae_channels: tuple[int, ...] = (32, 64)  # two blocks: latents are image_size / 2
    latent_channels: int = 4
    text_hidden: int = 32
    text_layers: int = 2
    text_heads: int = 2
    text_max_length: int = 24  # shapes prompts are at most 16 tokens; a short context keeps attention cheap
    layers: int = 4
    heads: int = 4
    head_dim: int = 32
    patch_size: int = 2
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> "TinySD3Config":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "vae_channels" in known:
            known["vae_channels"] = tuple(known["vae_channels"])
        return cls(**known)

    def to_dict(self) -> dict:
        return asdict(self)


def build_tiny_sd3(out_dir: Path, cfg: TinySD3Config) -> Path:
    """Create a randomly initialised tiny SD3 pipeline folder at out_dir."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from soarbench.clip_tokenizer import CLIP_VOCAB_SIZE, write_clip_tokenizer_files

    torch.manual_seed(cfg.seed)
    tok_dir = Path(out_dir) / "_tokenizer_src"
    write_clip_tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"),
                              model_max_length=cfg.text_max_length)

    def text_encoder():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE, hidden_size=cfg.text_hidden, intermediate_size=4 * cfg.text_hidden,
            num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
            max_position_embeddings=cfg.text_max_length, projection_dim=cfg.text_hidden,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act="quick_gelu"))

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
        block_out_channels=cfg.vae_channels, layers_per_block=1, norm_num_groups=8,
        sample_size=cfg.image_size, scaling_factor=1.0, shift_factor=0.0,
        use_quant_conv=False, use_post_quant_conv=False)
    latent = cfg.image_size // 2 ** (len(cfg.vae_channels) - 1)
    transformer = SD3Transformer2DModel(
        sample_size=latent, patch_size=cfg.patch_size, in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels, num_layers=cfg.layers, attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.heads, joint_attention_dim=2 * cfg.text_hidden,
        caption_projection_dim=cfg.heads * cfg.head_dim, pooled_projection_dim=2 * cfg.text_hidden,
        pos_embed_max_size=latent // cfg.patch_size, qk_norm="rms_norm")
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=text_encoder(), tokenizer=tokenizer,
        text_encoder_2=text_encoder(), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(out_dir)
    import shutil

    shutil.rmtree(tok_dir)
    return Path(out_dir)
