"""lm-evaluation-harness adapter: our ``LanguageModel`` as an ``lm_eval.api.model.LM`` named "mamba3".

Requests (lm-eval 0.4 protocol):
* ``loglikelihood``: (context, continuation) -> (sum of log p(continuation tokens | context),
  whether greedy decoding reproduces the continuation). Tokenisation follows lm-eval's HF model:
  trailing spaces of the context move to the continuation, the continuation's ids are those of
  enc(context + continuation) after the ids of enc(context); an empty context is replaced by EOS.
  Long inputs keep their last ``max_length`` tokens.
* ``loglikelihood_rolling``: (text,) -> sum of log p over every token of the text, scored in
  disjoint windows of ``max_length`` tokens with EOS as the first context (lm-eval's rolling
  windows), used for perplexity tasks.
* ``generate_until``: (context, {"until": [...], "max_gen_toks": n}) -> greedy text, cut at the
  first stop string.

lm-eval is optional: importing this module needs it (``pip install lm-eval``).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model


@register_model("mamba3")
class Mamba3LM(LM):
    """model: a ``mamba3.models.LanguageModel``; tokenizer: object with encode(str) -> list[int],
    decode(list[int]) -> str and ``eos_token_id``. ``from lm-eval``: model_args
    "pretrained=DIR,tokenizer=PATH|bytes,device=cpu,batch_size=8,max_length=2048"."""

    def __init__(self, model=None, tokenizer=None, *, pretrained: Optional[str] = None, device: Optional[str] = "cpu",
                 batch_size=8, max_length: int = 2048, dtype: Optional[str] = None, **kwargs):
        super().__init__()
        device = device or "cpu"
        if model is None:
            if pretrained is None:
                raise ValueError("give a model or pretrained=DIR")
            from ..models import LanguageModel
            dt = None if dtype in (None, "auto") else getattr(torch, dtype)
            model = LanguageModel.from_pretrained(pretrained, device=device, dtype=dt)
        if tokenizer is None or isinstance(tokenizer, str):
            from ..models.tokenizer import load_tokenizer
            spec = tokenizer
            if spec is None and pretrained is not None:
                import os
                spec = pretrained if os.path.exists(os.path.join(pretrained, "tokenizer.json")) else None
            tokenizer = load_tokenizer(None if spec in (None, "byte", "bytes") else spec)
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs an eos token (used as the context of empty prompts)")
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self._device = torch.device(device)
        self.batch_size_ = 8 if batch_size in (None, "auto") else int(str(batch_size).split(":")[0])
        self.max_length = int(max_length)

    # lm-eval reads these
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def device(self):
        return self._device

    def tok_encode(self, s: str) -> List[int]:
        return list(self.tokenizer.encode(s))

    # ------------------------------------------------------------------------------------------
    def _encode_pair(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx):]

    @torch.no_grad()
    def _score(self, pairs: List[Tuple[List[int], List[int]]]) -> List[Tuple[float, bool]]:
        """pairs of (context ids, continuation ids) -> (sum log p(continuation), greedy match).
        Rows are right-padded to a common length (a causal model never reads the padding)."""
        rows, spans = [], []
        for ctx, cont in pairs:
            if not cont:
                raise ValueError("empty continuation")
            ids = (ctx + cont)[-(self.max_length + 1):]
            n = min(len(cont), len(ids) - 1)  # a continuation longer than the window: its tail
            # logits at position t predict token t + 1: the input drops the last token
            rows.append(ids[:-1])
            spans.append((len(ids) - 1 - n, n, ids[-n:]))
        T = max(len(r) for r in rows)
        x = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            x[i, :len(r)] = torch.tensor(r)
        logp = F.log_softmax(self.model(x.to(self._device)).logits.float(), dim=-1)
        out = []
        for i, (start, n, target) in enumerate(spans):
            lp = logp[i, start:start + n]
            tgt = torch.tensor(target, device=lp.device)
            total = float(lp.gather(1, tgt[:, None]).sum())
            greedy = bool((lp.argmax(-1) == tgt).all())
            out.append((total, greedy))
        return out

    def _batched(self, pairs):
        # longest first (lm-eval's habit) so padding waste stays small; results in input order
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        res = [None] * len(pairs)
        for s in range(0, len(order), self.batch_size_):
            idx = order[s:s + self.batch_size_]
            for i, r in zip(idx, self._score([pairs[i] for i in idx])):
                res[i] = r
        return res

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        pairs = []
        for req in requests:
            context, continuation = req.args
            if context == "":
                cont = self.tok_encode(continuation)
                pairs.append(([self.eot_token_id], cont))
            else:
                pairs.append(self._encode_pair(context, continuation))
        return self._batched(pairs)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        out = []
        for req in requests:
            (text,) = req.args
            windows = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.eot_token_id,
                                                         max_seq_len=self.max_length, context_len=1)
            pairs = [lm_utils.make_disjoint_window(w) for w in windows]
            out.append(sum(ll for ll, _ in self._batched([(list(c), list(t)) for c, t in pairs])))
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False):
        out = []
        for req in requests:
            context, kw = req.args
            kw = dict(kw or {})
            until = kw.pop("until", None) or []
            if isinstance(until, str):
                until = [until]
            max_new = int(kw.pop("max_gen_toks", 256))
            ids = self.tok_encode(context) or [self.eot_token_id]
            ids = ids[-max(1, self.max_length - max_new):]
            gen = self.model.generate([torch.tensor(ids, device=self._device)], max_new_tokens=max_new,
                                      temperature=0.0, eos_token_id=self.eot_token_id)
            n = int(gen.num_generated[0])
            toks = [t for t in gen.tokens[0, :n].tolist() if t != self.eot_token_id]
            text = self.tokenizer.decode(toks)
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop)[0]
            out.append(text)
        return out
