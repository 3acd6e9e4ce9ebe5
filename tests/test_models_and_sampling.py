"""The tiny SD3 loads through the one loader; our Euler CFG sampler equals diffusers' SD3 pipeline."""
from __future__ import annotations

import json

import pytest
import torch

from soarbench.errors import UserError
from soarbench.models import SD3Adapter
from soarbench.sampling.ode import euler_sample


def test_clip_tokenizer_from_open_clip_vocabulary_matches_openai_ids(tiny_model_dir):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408


@pytest.mark.parametrize("steps,guidance", [(4, 4.5), (3, 1.0)])
def test_euler_cfg_sampler_matches_the_diffusers_pipeline(adapter, steps, guidance):
    prompts = ["a photo of a red circle", "a photo of two crosses"]
    noise = torch.randn(2, *adapter.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    ours = euler_sample(adapter, adapter.encode_prompts(prompts), noise, num_steps=steps, guidance=guidance)
    ref = adapter.pipe(prompt=prompts, latents=noise.clone(), num_inference_steps=steps, guidance_scale=guidance,
                       height=32, width=32, output_type="latent", max_sequence_length=0).images
    assert torch.allclose(ours, ref.float(), atol=1e-5)


def test_not_a_model_folder_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        SD3Adapter.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a model folder"):
        SD3Adapter.from_pretrained(tmp_path / "empty")


def test_checkpoint_folder_loads_its_components_over_the_base(adapter, tiny_model_dir, tmp_path):
    with torch.no_grad():
        for p in adapter.transformer.parameters():
            p.add_(0.01)
    adapter.save_components(tmp_path / "ckpt", ["transformer"], tiny_model_dir, {"step": 3})
    record = json.loads((tmp_path / "ckpt" / "soarbench_checkpoint.json").read_text())
    assert record["components"] == ["transformer"] and record["step"] == 3
    loaded = SD3Adapter.from_pretrained(tmp_path / "ckpt")  # the T5 length comes from the checkpoint record
    assert record["max_sequence_length"] == 0 and loaded.max_sequence_length == 0
    assert SD3Adapter.from_pretrained(tiny_model_dir).max_sequence_length == 77  # nothing recorded: SD3's 77
    base = SD3Adapter.from_pretrained(tiny_model_dir, max_sequence_length=0)
    for (n, a), b, c in zip(adapter.transformer.named_parameters(), loaded.transformer.parameters(),
                            base.transformer.parameters()):
        assert torch.equal(a, b), n
        assert not torch.equal(b, c)
    # everything not in the checkpoint comes from the base folder
    for a, b in zip(loaded.vae.parameters(), base.vae.parameters()):
        assert torch.equal(a, b)


def test_the_clip_tokenizers_are_parsed_once_and_shared_only_by_identical_files(tiny_model_dir, tmp_path):
    """Loading a model folder again reuses its tokenizers (tokenizer and tokenizer_2 are the same files here, so
    one object), and they encode as a tokenizer read afresh from the folder does; a folder whose tokenizer files
    differ gets its own."""
    import json
    import shutil

    from transformers import CLIPTokenizer

    from soarbench.models import SD3Adapter

    first = SD3Adapter.from_pretrained(tiny_model_dir, max_sequence_length=0)
    again = SD3Adapter.from_pretrained(tiny_model_dir, max_sequence_length=0)
    assert first.pipe.tokenizer is again.pipe.tokenizer is first.pipe.tokenizer_2
    fresh = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer_2")
    prompt = ["a photo of a red cube left of a blue sphere"]
    ids = first.pipe.tokenizer_2(prompt, padding="max_length").input_ids
    assert ids == fresh(prompt, padding="max_length").input_ids

    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    config = other / "tokenizer_2" / "tokenizer_config.json"
    doc = json.loads(config.read_text())
    doc["model_max_length"] = fresh.model_max_length - 2
    config.write_text(json.dumps(doc))
    (other / "SHA256SUMS").unlink(missing_ok=True)  # the copy's files changed on purpose
    changed = SD3Adapter.from_pretrained(other, max_sequence_length=0)
    assert changed.pipe.tokenizer is first.pipe.tokenizer
    assert changed.pipe.tokenizer_2 is not first.pipe.tokenizer_2
    assert changed.pipe.tokenizer_2.model_max_length == fresh.model_max_length - 2
