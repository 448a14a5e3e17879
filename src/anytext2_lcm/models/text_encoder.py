"""CLIP text encoder (transformers ``CLIPTextModel``) with AnyText2's prompt handling, without monkey-patching.

* Image prompts are tokenised without truncation, padded to the longest prompt of the batch, split into
  75-token chunks, each re-wrapped as BOS + chunk (+ EOS padding) + EOS = 77 tokens, encoded separately and
  concatenated along the sequence: context (B, 77·k, D). An empty batch of prompts gives one chunk BOS + 76 EOS.
* Text prompts (WriteNet context) are truncated/padded to 77 tokens, never chunked.
* Line embeddings are spliced into the token embeddings *before* the position embeddings are added: every token
  equal to the placeholder id (``*`` → 265, only when whitespace-delimited) takes the sample's next line
  embedding, in order. The per-sample cursor is explicit (``cursor`` in, new cursor out): AnyText2 lets it run
  through the image-prompt chunks and resets it before the text prompt.

The tokenizer is built offline from the CLIP BPE vocabulary that ships inside this package (identical ids to
openai/clip-vit-large-patch14), or from a local folder holding ``vocab.json`` + ``merges.txt``.
"""

from __future__ import annotations

import functools
import gzip
import inspect
import logging
from importlib import resources
from pathlib import Path

import torch
import torch.nn as nn

from ..config import CLIPConfig

log = logging.getLogger(__name__)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte → printable-unicode table, in the vocabulary's order.

    Printable bytes map to themselves and come first (in byte order); the remaining bytes follow, mapped to
    code points 256, 257, ... The order matters: it is the order of the first 256 vocabulary entries.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@functools.lru_cache(maxsize=1)
def _bundled_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab (49408 tokens) and merges (48894) from the bundled ``bpe_simple_vocab_16e6.txt.gz``."""
    data = resources.files("anytext2_lcm").joinpath("assets/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {t: i for i, t in enumerate(tokens)}, merges


@functools.lru_cache(maxsize=4)
def build_tokenizer(tokenizer_path: str | None = None, model_max_length: int = 77):
    """A transformers ``CLIPTokenizer`` (pad = EOS = 49407, BOS = 49406).

    Args:
        tokenizer_path: folder with ``vocab.json`` and ``merges.txt`` (or a saved tokenizer); None = bundled BPE.
    """
    from transformers import CLIPTokenizer

    special = dict(bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                   model_max_length=model_max_length)
    if tokenizer_path is not None:
        p = Path(tokenizer_path)
        if not p.is_dir():
            raise FileNotFoundError(f"clip.tokenizer_path {p} is not a folder")
        tok = CLIPTokenizer.from_pretrained(str(p), **special)
    else:
        vocab, merges = _bundled_vocab()
        try:  # transformers >= 5: vocab dict + list of merge pairs
            tok = CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m) for m in merges], **special)
        except TypeError:  # transformers < 5 only accepts files
            import json
            import tempfile

            d = Path(tempfile.mkdtemp(prefix="clip_tok_"))
            (d / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
            (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges), encoding="utf-8")
            tok = CLIPTokenizer(vocab_file=str(d / "vocab.json"), merges_file=str(d / "merges.txt"), **special)
    if len(tok) < 1000:
        raise RuntimeError(f"the CLIP tokenizer was built with only {len(tok)} tokens; check tokenizer files")
    return tok


def split_chunks(ids: torch.Tensor, chunk: int = 75) -> list[torch.Tensor]:
    """Split (B, n) ids padded to the longest prompt into 77-token chunks (AnyText2's ``split_chunks``).

    Each chunk is BOS + 75 ids + EOS; the last partial chunk is padded with the EOS id before the final EOS.
    """
    B, n = ids.shape
    start, end = ids[:, :1], ids[:, -1:]
    body = ids[:, 1:-1]
    out = []
    if n == 2:
        out.append(torch.cat([start] + [end] * (chunk + 1), dim=1))
    full = (n - 2) // chunk
    for i in range(full):
        out.append(torch.cat([start, body[:, i * chunk:(i + 1) * chunk], end], dim=1))
    rest = (n - 2) % chunk
    if rest:
        tail = body[:, -rest:]
        out.append(torch.cat([start, tail, end.expand(B, chunk - rest), end], dim=1))
    return out


def splice_lines(ids: torch.Tensor, embeds: torch.Tensor, lines: list[torch.Tensor] | None, placeholder_id: int,
                 cursor: list[int]) -> tuple[torch.Tensor, list[int]]:
    """Replace placeholder token embeddings by line embeddings, per sample, in order.

    Args:
        ids: (B, T) token ids.
        embeds: (B, T, D) token embeddings.
        lines: per sample a (n_b, D) tensor of line embeddings (None: nothing to splice).
        cursor: per sample, how many of its lines were already used.
    Returns:
        (new embeddings, new cursor). Placeholders beyond a sample's lines keep their token embedding (a warning
        is logged); samples beyond ``len(lines)`` are left unchanged.
    """
    if lines is None:
        return embeds, list(cursor)
    cursor = list(cursor)
    out = embeds
    mask = ids == placeholder_id
    if not bool(mask.any()):
        return embeds, cursor
    rows = []
    for b in range(ids.shape[0]):
        pos = mask[b].nonzero(as_tuple=True)[0]
        if len(pos) == 0 or b >= len(lines):
            rows.append(embeds[b])
            continue
        avail = lines[b].shape[0] - cursor[b]
        k = min(len(pos), max(avail, 0))
        if k < len(pos):
            log.warning("sample %d has %d placeholders but only %d unused line embeddings; the rest keep the '*' "
                        "token embedding", b, len(pos), max(avail, 0))
        row = embeds[b]
        if k > 0:
            row = row.index_put((pos[:k],), lines[b][cursor[b]:cursor[b] + k].to(row.dtype))
            cursor[b] += k
        rows.append(row)
    out = torch.stack(rows)
    return out, cursor


class _Holder(nn.Module):
    """Keeps the original key layout ``transformer.text_model.*`` whatever transformers' own nesting is."""

    def __init__(self, text_model: nn.Module):
        super().__init__()
        self.text_model = text_model


class TextEncoder(nn.Module):
    """``cond_stage_model``: the frozen CLIP text transformer plus AnyText2's prompt handling."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        self.cfg = cfg
        hf = CLIPTextConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                            intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                            num_attention_heads=cfg.num_attention_heads,
                            max_position_embeddings=cfg.max_position_embeddings, hidden_act=cfg.hidden_act,
                            layer_norm_eps=cfg.layer_norm_eps, bos_token_id=49406, eos_token_id=49407,
                            pad_token_id=49407)
        hf._attn_implementation = "sdpa"
        clip = CLIPTextModel(hf)
        self.transformer = _Holder(getattr(clip, "text_model", clip))
        enc = self.transformer.text_model.encoder
        self._legacy_mask_arg = "causal_attention_mask" in inspect.signature(enc.forward).parameters

    @property
    def tokenizer(self):
        return build_tokenizer(self.cfg.tokenizer_path, self.cfg.max_position_embeddings)

    @property
    def placeholder_id(self) -> int:
        ids = self.tokenizer(self.cfg.placeholder)["input_ids"]
        if len(ids) != 3:
            raise ValueError(f"placeholder {self.cfg.placeholder!r} is not a single CLIP token")
        return int(ids[1])

    def tokenize_image_prompts(self, prompts: list[str]) -> list[torch.Tensor]:
        """Image prompts → list of (B, 77) chunks (padded to the longest prompt, then chunked)."""
        enc = self.tokenizer(list(prompts), truncation=False, padding="longest", return_tensors="pt",
                             verbose=False)
        return split_chunks(enc["input_ids"], self.cfg.max_position_embeddings - 2)

    def tokenize_text_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text prompts → (B, 77), truncated and padded to the maximum length."""
        enc = self.tokenizer(list(prompts), truncation=True, max_length=self.cfg.max_position_embeddings,
                             padding="max_length", return_tensors="pt")
        return enc["input_ids"]

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        return self.transformer.text_model.embeddings.token_embedding(ids)

    def encode_embeddings(self, token_embeds: torch.Tensor) -> torch.Tensor:
        """(B, T, D) token embeddings (after splicing) → (B, T, D) last hidden state after the final LayerNorm."""
        tm = self.transformer.text_model
        T = token_embeds.shape[1]
        pos = torch.arange(T, device=token_embeds.device)
        h = token_embeds + tm.embeddings.position_embedding(pos)[None]
        mask = torch.full((T, T), torch.finfo(h.dtype).min, device=h.device, dtype=h.dtype).triu(1)[None, None]
        mask = mask.expand(h.shape[0], 1, T, T)
        if self._legacy_mask_arg:
            out = tm.encoder(inputs_embeds=h, attention_mask=None, causal_attention_mask=mask)
        else:
            out = tm.encoder(inputs_embeds=h, attention_mask=mask)
        h = out[0] if isinstance(out, (tuple, list)) else getattr(out, "last_hidden_state", out)
        return tm.final_layer_norm(h)

    def encode_ids(self, ids: torch.Tensor, lines: list[torch.Tensor] | None = None,
                   cursor: list[int] | None = None) -> tuple[torch.Tensor, list[int], torch.Tensor]:
        """One 77-token call: (B, 77) ids → (context (B, 77, D), new cursor, spliced token embeddings)."""
        device = self.transformer.text_model.embeddings.token_embedding.weight.device
        ids = ids.to(device)
        emb = self.token_embeddings(ids)
        cursor = cursor if cursor is not None else [0] * ids.shape[0]
        emb, cursor = splice_lines(ids, emb, lines, self.placeholder_id, cursor)
        return self.encode_embeddings(emb), cursor, emb

    def encode_image_prompts(self, prompts: list[str], lines: list[torch.Tensor] | None = None,
                             cursor: list[int] | None = None) -> tuple[torch.Tensor, list[int]]:
        """Image prompts → (B, 77·k, D) (chunks concatenated), advancing the line cursor through the chunks."""
        outs = []
        for ids in self.tokenize_image_prompts(prompts):
            z, cursor, _ = self.encode_ids(ids, lines, cursor)
            outs.append(z)
        return torch.cat(outs, dim=1), cursor

    def encode_text_prompts(self, prompts: list[str], lines: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Text prompts → (B, 77, D) with the line embeddings spliced in (cursor starts at 0)."""
        z, _, _ = self.encode_ids(self.tokenize_text_prompts(prompts), lines, None)
        return z
