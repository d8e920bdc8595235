"""Helpers for the zoom-loop tests (owned by tests/test_cof_loop.py, also used by tests/test_cof_eval.py): random
images, and a scripted stand-in model that emits given texts through model.py's cache interface."""
import torch


def img(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


def boost(tok, texts, amount):
    """A logits processor that adds `amount` to the tokens of `texts` (fuzzing: the sampler sees them often)."""
    ids = sorted({i for t in texts for i in tok.encode(t)})

    def proc(views, logits):
        logits[:, ids] += amount
        return logits
    return proc


def call(b):
    return f'<tool_call>\n{{"name": "image_zoom_in_tool", "arguments": {{"bbox_2d": {b}}}}}\n</tool_call>'


# ---- the scripted stand-in ----------------------------------------------------------------------------------------

class ScriptCache:
    def __init__(self, n):
        self.rows = [[] for _ in range(n)]     # real tokens per row
        self.src = list(range(n))              # which script each row follows
        self.images = [[] for _ in range(n)]   # pixel_values seen per row

    def repeat_interleave(self, g):
        self.rows = [list(r) for r in self.rows for _ in range(g)]
        self.images = [list(r) for r in self.images for _ in range(g)]
        self.src = [s for s in self.src for _ in range(g)]
        return self

    def select(self, keep):
        self.rows = [self.rows[i] for i in keep]
        self.images = [self.images[i] for i in keep]
        self.src = [self.src[i] for i in keep]
        return self


class ScriptedModel:
    """Emits scripts[q][k] (text of turn k for question q, then <|im_end|>) through new_cache / extend, checking that
    the loop feeds back exactly what it emitted and that every <|image_pad|> run comes with its image."""
    device = torch.device("cpu")

    def __init__(self, tok, scripts, vocab=None):
        self.tok, self.vocab = tok, vocab or tok.vocab_size
        self.scripts = [[tok.encode(t) + [tok.im_end_id] for t in s] for s in scripts]
        self.header = tok.encode("<|im_start|>assistant\n")
        self.calls = 0

    def new_cache(self, batch_size):
        return ScriptCache(batch_size)

    def _next(self, row, src):
        n = len(self.header)
        starts = [i + n for i in range(len(row) - n + 1) if row[i:i + n] == self.header]
        assert starts, "no assistant header: the loop asked for a token outside an assistant turn"
        k, j = len(starts) - 1, len(row) - starts[-1]
        script = self._script(row, src)
        turn = script[min(k, len(script) - 1)]
        return turn[j] if j < len(turn) else self.tok.im_end_id

    def _script(self, row, src):
        return self.scripts[src]

    def extend(self, cache, input_ids, mask=None, pixel_values=None, image_grid_thw=None, last_only=False):
        assert last_only
        self.calls += 1
        B, L = input_ids.shape
        mask = torch.ones(B, L, dtype=torch.bool) if mask is None else mask
        grids = [] if image_grid_thw is None else image_grid_thw.tolist()
        pv_off, gi = 0, 0
        logits = torch.zeros(B, 1, self.vocab)
        for b in range(B):
            new = input_ids[b][mask[b]].tolist()
            if new and cache.rows[b]:   # the token we emitted last must come back first
                assert new[0] == self._next(cache.rows[b], cache.src[b]), "loop did not feed back the emitted token"
            runs = sum(1 for i, t in enumerate(new) if t == self.tok.image_pad_id and (i == 0 or new[i - 1] != t))
            for _ in range(runs):
                t, h, w = grids[gi]
                n = t * h * w
                cache.images[b].append(pixel_values[pv_off:pv_off + n])
                pv_off += n
                gi += 1
            cache.rows[b] += new
            if cache.rows[b]:
                logits[b, 0, self._next(cache.rows[b], cache.src[b])] = 1.0
        assert gi == len(grids) and (pixel_values is None or pv_off == pixel_values.shape[0])
        return logits
