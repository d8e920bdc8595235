"""Helpers for the model.py tests (owned by the model tests): tiny checkpoints, the transformers oracle, inputs."""
import atexit
import functools
import os
import shutil
import tempfile

import torch

import model as M
from data import tiny
import tokenizer as T

_ROOT = tempfile.mkdtemp(prefix="tiny_qwen25vl_")
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)       # the session's tiny checkpoints go with it


@functools.lru_cache(maxsize=None)
def tiny_dir(layout="flat", tie=False, **kw) -> str:
    """A tiny random checkpoint directory, built once per test session per argument set."""
    name = f"{layout}_{'tied' if tie else 'untied'}_" + "_".join(f"{k}{v}" for k, v in sorted(kw.items()))
    return tiny.make_tiny(os.path.join(_ROOT, name), layout=layout, tie_word_embeddings=tie, **kw)


@functools.lru_cache(maxsize=None)
def ours(directory):
    return M.Qwen25VL.from_pretrained(directory)


@functools.lru_cache(maxsize=None)
def hf(directory):
    from transformers import Qwen2_5_VLForConditionalGeneration
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()


def hf_logits(model, ids, pv=None, grid=None, mask=None):
    image_id = model.config.image_token_id
    with torch.no_grad():  # transformers >= 5.3 builds 3-D positions only when mm_token_type_ids is passed
        return model(input_ids=ids, pixel_values=pv, image_grid_thw=grid, attention_mask=mask,
                     mm_token_type_ids=(ids == image_id).int()).logits


def seq(cfg, grids, text=(5, 6, 7), between=(8, 9)):
    """Token ids: text, then for each image <|vision_start|> + pads + <|vision_end|> + a little text."""
    ids = list(text)
    for t, h, w in grids:
        ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * (t * h * w // 4) + [cfg.vision_end_token_id]
        ids += list(between)
    return ids


def pixels(grids, seed=0):
    n = sum(t * h * w for t, h, w in grids)
    if not n:
        return None, None
    return torch.randn(n, 1176, generator=torch.Generator().manual_seed(seed)), torch.tensor(grids)


def left_pad(rows, pad_id):
    L = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def hf_processor(directory):
    """Qwen2_5_VLProcessor with the PIL image processor (AutoProcessor also wants torchvision for videos)."""
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor
    try:
        from transformers import AutoProcessor
        return AutoProcessor.from_pretrained(directory)
    except ImportError:
        pass
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class _NoVideoProcessor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            return type(None) if arg is None else super().check_argument_for_proper_class(name, arg)

    return _NoVideoProcessor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(directory),
                             tokenizer=AutoTokenizer.from_pretrained(directory), video_processor=None,
                             chat_template=T.CHAT_TEMPLATE)
