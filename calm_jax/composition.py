"""CALM: an anchor LM m_B composed with one or more frozen augmenting LMs m_A (paper §3).

For every connection (augmenting layer i -> anchor layer j) the composed model adds
f_cross(f_proj(H_A,i), H_B,j) (calm_jax.cross_attention) to the anchor's residual stream
after layer j; the logits come from the anchor. Only Θ_C (the connections' parameters)
is trainable; both kinds of frozen models are inputs under `jax.lax.stop_gradient`.

The cross-attention is causal by slot and ignores padding, with the same mask helper as
self-attention: anchor slot t sees augmenting slots s <= t that hold real tokens.

Decoding (`ComposedLM` with a `ComposedCache`) has two modes:
  - iterative (the paper's CALM, default): every apply runs the new tokens through every
    augmenting model (each with its own KV cache) and appends the k/v of f_proj of their
    tapped states to the cross-attention cache, so anchor slot t sees augmenting slots
    <= t. Cached decoding equals the uncached `composed_forward` over the whole sequence.
  - encoder (the paper's "m_A as encoder" ablation): only the *first* apply on a fresh
    cache (the prefill) runs the augmenting models; later applies reuse the prompt's cross
    k/v untouched, so every generated position attends to all (real) prompt slots and
    prompt slot t to prompt slots <= t. This equals `composed_forward` over the whole
    sequence with `augment_mask_BxT` = the prompt's mask (augmenting models see only the
    prompt). A static flag on the cache (`augments_done`) records that the prefill ran,
    so the prefill must be its own apply (not the first step of a decode loop).
    `encoder_mode_loss` trains Θ_C under the same semantics (augmenting models shown the
    prompt of each training example only).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import struct

from calm_jax import masks
from calm_jax.config import ModelConfig
from calm_jax.cross_attention import CrossAttention
from calm_jax.model import KVCache, LMOutput, forward, head_logits, init_cache
from calm_jax.train_step import chunked_next_token_loss, next_token_loss

Pair = tuple[int, int]


class CompositionError(ValueError):
    """A composition that cannot be built: bad connections, mismatched models or vocabularies."""


def default_connections(num_augment_layers: int, num_anchor_layers: int) -> tuple[Pair, ...]:
    """The paper's layer choice: every 4th augmenting layer, n uniformly spaced anchor layers.

    n = max(1, min(N_A // 4, N_B)), and the k-th connection (k = 1..n), 0-based, is

        augmenting layer ceil(k * N_A / n) - 1  ->  anchor layer ceil(k * N_B / n) - 1.

    With N_A divisible by 4 (and N_A / 4 <= N_B) this is augmenting layers 3, 7, ..., N_A - 1
    feeding anchor layers N_B/n - 1, 2 N_B/n - 1, ..., N_B - 1 (rounded up when n does not
    divide N_B). Otherwise the n augmenting layers are spread uniformly too, so the last
    connection always joins the two last layers: N_A < 4 gives the single pair
    (N_A - 1, N_B - 1); N_A / 4 > N_B is capped at one connection per anchor layer.
    Examples: (8, 8) -> (3, 3), (7, 7); (8, 24) -> (3, 11), (7, 23); (6, 10) -> (5, 9);
    (16, 2) -> (7, 0), (15, 1).
    """
    for name, n_layers in (("augmenting", num_augment_layers), ("anchor", num_anchor_layers)):
        if n_layers < 1:
            raise CompositionError(f"{name} model must have at least one layer, found {n_layers}")
    n = max(1, min(num_augment_layers // 4, num_anchor_layers))
    return tuple((-(-k * num_augment_layers // n) - 1, -(-k * num_anchor_layers // n) - 1) for k in range(1, n + 1))


def _check_pairs(k: int, pairs, augment: ModelConfig, anchor: ModelConfig) -> tuple[Pair, ...]:
    where = f"connections for augmenting model {k}"
    try:
        pairs = tuple((int(i), int(j)) for i, j in pairs)
    except (TypeError, ValueError) as e:
        raise CompositionError(f"{where}: expected (augment layer, anchor layer) integer pairs, found {pairs!r}") from e
    if not pairs:
        raise CompositionError(f"{where}: empty; give at least one (augment layer, anchor layer) pair")
    for i, j in pairs:
        if not 0 <= i < augment.num_layers:
            raise CompositionError(f"{where}: layer {i} out of range for augmenting model {k} "
                                   f"({augment.family}, {augment.num_layers} layers: 0..{augment.num_layers - 1})")
        if not 0 <= j < anchor.num_layers:
            raise CompositionError(f"{where}: anchor layer {j} out of range for the anchor "
                                   f"({anchor.family}, {anchor.num_layers} layers: 0..{anchor.num_layers - 1})")
    for a, b in zip(pairs, pairs[1:]):
        if a == b:
            raise CompositionError(f"{where}: duplicate pair {a}")
        if b[0] < a[0] or b[1] < a[1]:
            raise CompositionError(f"{where}: pairs must be in increasing order of both layers "
                                   f"(the k-th augmenting layer feeds the k-th anchor layer); {b} follows {a}")
    return pairs


@dataclasses.dataclass(frozen=True)
class CompositionConfig:
    """How an anchor and its augmenting models are joined. Hashable (a static jit argument).

    anchor, augments: the models' configs (one or more augmenting models).
    connections: per augmenting model, (augment layer i, anchor layer j) pairs, 0-based, in
      increasing order of both layers: a sequence with one entry per augmenting model, or a
      {model index: pairs} mapping; None (for all, or for one model) = `default_connections`.
      Stored normalised: one tuple of pairs per augmenting model.
    num_heads: cross-attention heads (default: the anchor's); head size = D_B / num_heads.
    Options beyond the paper, all off by default:
      query_norm: RMSNorm on the anchor state before W^Q.
      zero_init_out: W^O starts at zero, so the initial composition equals the anchor.
      gate: output scaled by tanh(g), one learned scalar g per connection, g = 1 at init.
      cross_rope: RoPE on the cross-attention's q and k at the tokens' positions (base: the
        anchor's rope_theta), so a connection can address the augmenting state at a given
        distance, e.g. at its own position (calm_jax.cross_attention). No new parameters.
    dtype: compute and storage dtype of Θ_C and of the cross-attention cache.
    """

    anchor: ModelConfig
    augments: tuple[ModelConfig, ...]
    connections: tuple[tuple[Pair, ...] | None, ...] | None = None
    num_heads: int | None = None
    query_norm: bool = False
    zero_init_out: bool = False
    gate: bool = False
    cross_rope: bool = False
    dtype: str = "float32"

    def __post_init__(self):
        augments = (self.augments,) if isinstance(self.augments, ModelConfig) else tuple(self.augments)
        if not augments:
            raise CompositionError("a composition needs at least one augmenting model")
        if not isinstance(self.anchor, ModelConfig):
            raise CompositionError(f"anchor must be a ModelConfig, found {type(self.anchor).__name__}")
        for k, aug in enumerate(augments):
            if not isinstance(aug, ModelConfig):
                raise CompositionError(f"augmenting model {k} must be a ModelConfig, found {type(aug).__name__}")
            if aug.vocab_size != self.anchor.vocab_size:
                raise CompositionError(f"augmenting model {k} has vocab_size {aug.vocab_size}, the anchor "
                                       f"{self.anchor.vocab_size}: CALM needs one shared vocabulary")
        conns = self.connections if self.connections is not None else (None,) * len(augments)
        if isinstance(conns, Mapping):
            unknown = sorted(set(conns) - set(range(len(augments))), key=str)
            if unknown:
                raise CompositionError(f"connections given for augmenting model {unknown[0]!r}, but there are only "
                                       f"{len(augments)} augmenting model(s) (0..{len(augments) - 1})")
            conns = tuple(conns.get(k) for k in range(len(augments)))
        conns = tuple(conns)
        if len(conns) > len(augments):
            raise CompositionError(f"connections given for augmenting model {len(augments)} (0-based), "
                                   f"but there are only {len(augments)} augmenting model(s)")
        if len(conns) < len(augments):
            raise CompositionError(f"connections given for {len(conns)} augmenting model(s), but there are "
                                   f"{len(augments)}; use None for a model that takes the default")
        conns = tuple(
            default_connections(aug.num_layers, self.anchor.num_layers) if pairs is None
            else _check_pairs(k, pairs, aug, self.anchor)
            for k, (aug, pairs) in enumerate(zip(augments, conns)))
        heads = self.num_heads if self.num_heads is not None else self.anchor.num_heads
        if heads < 1 or self.anchor.hidden_size % heads:
            raise CompositionError(f"cross-attention heads ({heads}) must divide the anchor's hidden size "
                                   f"({self.anchor.hidden_size})")
        if self.cross_rope and (self.anchor.hidden_size // heads) % 2:
            raise CompositionError(f"cross_rope needs an even cross-attention head size; hidden "
                                   f"{self.anchor.hidden_size} / {heads} heads = {self.anchor.hidden_size // heads}")
        object.__setattr__(self, "augments", augments)
        object.__setattr__(self, "connections", conns)
        object.__setattr__(self, "num_heads", heads)

    @property
    def head_dim(self) -> int:
        return self.anchor.hidden_size // self.num_heads

    def cross_attention(self, k: int) -> CrossAttention:
        """The linen module of augmenting model k's connections (one shape for all of them)."""
        rope_theta = (self.anchor.rope_theta if self.anchor.position == "rope" else 10000.0) if self.cross_rope else None
        return CrossAttention(self.anchor.hidden_size, self.num_heads, self.head_dim, self.query_norm,
                              self.zero_init_out, self.gate, self.dtype, self.dtype, rope_theta, parent=None)


def check_vocabularies(anchor_tokenizer, augment_tokenizers: Sequence) -> None:
    """Raises CompositionError unless every augmenting tokenizer has the anchor's vocabulary.

    Compares the full token -> id maps (`get_vocab()`), not just their sizes, and names the
    first (lowest id) token that differs.
    """
    ref = anchor_tokenizer.get_vocab()
    ref_by_id = {i: t for t, i in ref.items()}
    for k, tok in enumerate(augment_tokenizers):
        other = tok.get_vocab()
        if other == ref:
            continue
        other_by_id = {i: t for t, i in other.items()}
        for i in sorted(set(ref_by_id) | set(other_by_id)):
            if ref_by_id.get(i) != other_by_id.get(i):
                raise CompositionError(
                    f"augmenting model {k}'s tokenizer differs from the anchor's at id {i}: anchor has "
                    f"{ref_by_id.get(i)!r}, augmenting model {k} has {other_by_id.get(i)!r} (vocab sizes "
                    f"{len(ref)} and {len(other)}); CALM needs one shared vocabulary")


def init_theta(ccfg: CompositionConfig, rng: jax.Array) -> dict:
    """Fresh Θ_C: {"augment_k": {"conn_c": {proj, q, k, v, o[, query_norm][, gate]}}} (plain dicts)."""
    theta = {}
    for k, (aug, pairs) in enumerate(zip(ccfg.augments, ccfg.connections)):
        module = ccfg.cross_attention(k)
        h_a = jnp.zeros((1, 1, aug.hidden_size), ccfg.dtype)
        h_b = jnp.zeros((1, 1, ccfg.anchor.hidden_size), ccfg.dtype)
        theta[f"augment_{k}"] = {
            f"conn_{c}": module.init(jax.random.fold_in(rng, 1000 * k + c), h_a, h_b, jnp.ones((1, 1, 1), bool),
                                     jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32))["params"]
            for c in range(len(pairs))}
    return theta


def param_count(theta) -> int:
    """Number of scalars in Θ_C (or any pytree of arrays)."""
    return sum(int(x.size) for x in jax.tree.leaves(theta))


def describe(ccfg: CompositionConfig, theta) -> str:
    """A few lines for CLIs: the models, each connection, the options and Θ_C's size."""
    a = ccfg.anchor
    lines = [f"anchor: {a.family}, {a.num_layers} layers, hidden {a.hidden_size}; cross-attention "
             f"{ccfg.num_heads} heads x {ccfg.head_dim}"]
    for k, (aug, pairs) in enumerate(zip(ccfg.augments, ccfg.connections)):
        lines.append(f"augment {k}: {aug.family}, {aug.num_layers} layers, hidden {aug.hidden_size}")
        lines += [f"  augment {k}: layer {i} -> anchor layer {j}" for i, j in pairs]
    options = [name for name in ("query_norm", "zero_init_out", "gate", "cross_rope") if getattr(ccfg, name)]
    lines.append(f"options: {', '.join(options) or 'none (as in the paper)'}")
    lines.append(f"Θ_C parameters: {param_count(theta):,}")
    return "\n".join(lines)


@struct.dataclass
class ComposedCache:
    """Everything a composed model carries between decoding steps.

    anchor: the anchor's KVCache. augments: one KVCache per augmenting model; its
    valid_BxS also marks which cross-attention slots are filled (the same tokens go
    through the augmenting model and into its cross k/v), so no copy is kept here.
    cross_k, cross_v: per augmenting model, per connection, k/v_BxSxHxK of f_proj of the
    tapped augmenting state, per slot; written once per token, never recomputed.
    augments_done: static; True once the encoder-mode prefill has run.
    """

    anchor: KVCache
    augments: tuple
    cross_k: tuple
    cross_v: tuple
    augments_done: bool = struct.field(pytree_node=False, default=False)


def _augment_layers(pairs) -> tuple[int, ...]:
    return tuple(sorted({i for i, _ in pairs}))


def init_composed_cache(ccfg: CompositionConfig, batch: int, length: int) -> ComposedCache:
    """An empty cache of `length` slots for the anchor, every augmenting model and every connection."""
    augments = []
    for aug, pairs in zip(ccfg.augments, ccfg.connections):
        c = init_cache(aug, batch, length)
        last = max(_augment_layers(pairs))
        # Layers after the last tap never run (logits=False), so their slots need no memory.
        # Distinct arrays, not one repeated: a donated cache must not hold a buffer twice.
        def empty():
            return tuple(jnp.zeros((batch, 0, aug.num_kv_heads, aug.head_dim), c.k[0].dtype)
                         for _ in range(aug.num_layers - last - 1))
        augments.append(c.replace(k=c.k[:last + 1] + empty(), v=c.v[:last + 1] + empty()))
    kv = tuple(tuple(jnp.zeros((batch, length, ccfg.num_heads, ccfg.head_dim), ccfg.dtype) for _ in pairs)
               for pairs in ccfg.connections)
    return ComposedCache(anchor=init_cache(ccfg.anchor, batch, length), augments=tuple(augments),
                         cross_k=kv, cross_v=jax.tree.map(jnp.copy, kv))


def composed_forward(ccfg: CompositionConfig, params, tokens_BxT, mask_BxT=None, cache: ComposedCache | None = None,
                     encoder_mode: bool = False, augment_mask_BxT=None, remat: str = "none",
                     logits: bool = True) -> LMOutput:
    """The composed model m_A⊕B on tokens_BxT; returns LMOutput(logits_BxTxV, {}, cache).

    params: {"theta": Θ_C, "anchor": anchor params, "augments": (augment params, ...)}.
      Gradients flow only into theta: the frozen trees and the augmenting states are
      under stop_gradient.
    mask_BxT: True for real tokens (default all); left or right padding.
    augment_mask_BxT: the slots the augmenting models see (default mask_BxT); a subset of
      mask_BxT. Without a cache, the prompt's mask here gives encoder-mode semantics.
    cache: a ComposedCache from `init_composed_cache`; tokens are written at its index. See
      the module docstring for iterative vs `encoder_mode` decoding.
    remat: the anchor layers' rematerialisation in a backward pass (model.REMAT_POLICIES).
      Only the anchor needs one: the augmenting models are under stop_gradient, so autodiff
      keeps nothing of theirs (nor of anchor layers before the first connection).
    logits: False returns the anchor's last-layer stream as taps[N_B - 1] instead of logits
      (model.head_logits makes them), for a loss that computes logits in chunks.
    """
    if mask_BxT is None:
        mask_BxT = jnp.ones(tokens_BxT.shape, bool)
    mask_BxT = mask_BxT.astype(bool)
    aug_mask_BxT = mask_BxT if augment_mask_BxT is None else augment_mask_BxT.astype(bool) & mask_BxT
    theta = params["theta"]
    frozen_anchor = jax.lax.stop_gradient(params["anchor"])
    frozen_augments = jax.lax.stop_gradient(tuple(params["augments"]))
    if len(frozen_augments) != len(ccfg.augments):
        raise CompositionError(f"params['augments'] holds {len(frozen_augments)} parameter trees for "
                               f"{len(ccfg.augments)} augmenting models")
    for m, pairs in enumerate(ccfg.connections):
        have = theta.get(f"augment_{m}", {})
        missing = [f"augment_{m}/conn_{c}" for c in range(len(pairs)) if f"conn_{c}" not in have]
        if missing:
            raise CompositionError(f"Θ_C has no parameters for {missing[0]}: it was made for a different composition "
                                   f"(this one has {len(pairs)} connection(s) for augmenting model {m})")

    t = tokens_BxT.shape[1]
    run_augments = cache is None or not (encoder_mode and cache.augments_done)
    q_slot_T = jnp.arange(t) if cache is None else cache.anchor.index + jnp.arange(t)

    def positions(mask, model_cache):  # as `forward` computes them; given to it explicitly
        return masks.positions_from_mask(mask, None if model_cache is None else
                                         model_cache.valid_BxS.sum(-1).astype(jnp.int32))

    anchor_pos_BxT = positions(mask_BxT, None if cache is None else cache.anchor)
    new_aug_caches, new_k, new_v, terms = [], [], [], {}
    for m, (aug, pairs) in enumerate(zip(ccfg.augments, ccfg.connections)):
        module = ccfg.cross_attention(m)
        conn_params = [theta[f"augment_{m}"][f"conn_{c}"] for c in range(len(pairs))]
        if run_augments:
            aug_pos_BxT = positions(aug_mask_BxT, None if cache is None else cache.augments[m])
            out = forward(aug, frozen_augments[m], tokens_BxT, aug_mask_BxT, aug_pos_BxT,
                          cache=None if cache is None else cache.augments[m],
                          taps=_augment_layers(pairs), logits=False)
            kv = [module.apply({"params": p}, jax.lax.stop_gradient(out.taps[i]), aug_pos_BxT,
                               method=CrossAttention.keys_values)
                  for p, (i, _) in zip(conn_params, pairs)]
            aug_cache = out.cache
        else:
            kv, aug_cache = None, cache.augments[m]
        if cache is None:
            k_slot_S, kv_valid_BxS = jnp.arange(t), aug_mask_BxT
        else:
            k_slot_S, kv_valid_BxS = jnp.arange(cache.anchor.length), aug_cache.valid_BxS
            if kv is None:
                kv = list(zip(cache.cross_k[m], cache.cross_v[m]))
            else:
                kv = [tuple(jax.lax.dynamic_update_slice_in_dim(old, x.astype(old.dtype), cache.anchor.index, 1)
                            for old, x in zip(olds, new))
                      for olds, new in zip(zip(cache.cross_k[m], cache.cross_v[m]), kv)]
            new_aug_caches.append(aug_cache)
            new_k.append(tuple(k for k, _ in kv))
            new_v.append(tuple(v for _, v in kv))
        mask_BxTxS = masks.attention_mask(q_slot_T, k_slot_S, kv_valid_BxS)
        for p, (_, j), (k_BxSxHxK, v_BxSxHxK) in zip(conn_params, pairs, kv):
            terms.setdefault(j, []).append((module, p, k_BxSxHxK, v_BxSxHxK, mask_BxTxS))

    def hook(j):
        def add_cross(h_BxTxD):
            return h_BxTxD + sum(module.apply({"params": p}, h_BxTxD, k, v, mask, anchor_pos_BxT,
                                              method=CrossAttention.attend)
                                 for module, p, k, v, mask in terms[j])
        return add_cross

    last = ccfg.anchor.num_layers - 1
    out = forward(ccfg.anchor, frozen_anchor, tokens_BxT, mask_BxT, anchor_pos_BxT,
                  cache=None if cache is None else cache.anchor, hooks={j: hook(j) for j in terms},
                  taps=() if logits else (last,), logits=logits, remat=remat)
    new_cache = None
    if cache is not None:
        new_cache = ComposedCache(anchor=out.cache, augments=tuple(new_aug_caches), cross_k=tuple(new_k),
                                  cross_v=tuple(new_v), augments_done=cache.augments_done or encoder_mode)
    return LMOutput(logits_BxTxV=out.logits_BxTxV, taps=out.taps, cache=new_cache)


def composed_loss(ccfg: CompositionConfig, remat: str = "none", loss_chunk: int = 0):
    """The loss_fn (calm_jax.train_step) train.compose trains Θ_C with: loss_fn(theta, frozen, batch)
    -> (loss_sum, n_tokens), frozen = {"anchor", "augments"}.

    remat: see `composed_forward`. loss_chunk: 0 for the plain loss over the B x T x V logits;
    N > 0 makes the logits N positions at a time (`train_step.chunked_next_token_loss`). The
    loss and Θ_C's gradients are the same either way.
    """
    if loss_chunk < 0:
        raise ValueError(f"loss_chunk must be >= 0, got {loss_chunk}")

    def loss_fn(theta, frozen, batch):
        params = {"theta": theta, **frozen}
        tokens_BxT, mask_BxT, target_BxT = batch["tokens_BxT"], batch["mask_BxT"], batch["target_BxT"]
        out = composed_forward(ccfg, params, tokens_BxT, mask_BxT, remat=remat, logits=not loss_chunk)
        if not loss_chunk:
            return next_token_loss(out.logits_BxTxV, tokens_BxT, target_BxT)
        anchor = jax.lax.stop_gradient(frozen["anchor"])
        return chunked_next_token_loss(lambda h: head_logits(ccfg.anchor, anchor, h),
                                       out.taps[ccfg.anchor.num_layers - 1], tokens_BxT, target_BxT, loss_chunk)
    return loss_fn


def encoder_mode_loss(ccfg: CompositionConfig):
    """The loss_fn (calm_jax.train_step) for training Θ_C with the augmenting models seeing only the prompt.

    loss_fn(theta, frozen, batch) -> (loss_sum, n_tokens), frozen = {"anchor", "augments"}:
    `composed_forward` with `augment_mask_BxT` = the real tokens that are not targets, so
    training sees exactly what encoder-mode decoding (`ComposedLM(ccfg, encoder_mode=True)`)
    computes for a prompt and its continuation. Rows with no prompt (text records) get no
    augmenting states at all.
    """
    def loss_fn(theta, frozen, batch):
        mask_BxT = batch["mask_BxT"].astype(bool)
        prompt_BxT = mask_BxT & ~batch["target_BxT"].astype(bool)
        out = composed_forward(ccfg, {"theta": theta, **frozen}, batch["tokens_BxT"], mask_BxT,
                               augment_mask_BxT=prompt_BxT)
        return next_token_loss(out.logits_BxTxV, batch["tokens_BxT"], batch["target_BxT"])
    return loss_fn


class ComposedLM:
    """A composition behind the interface of `calm_jax.model.PlainLM`.

    - `apply(params, tokens_BxT, mask_BxT=None, cache=None) -> LMOutput`, with
      params = {"theta": Θ_C, "anchor": ..., "augments": (...)}
    - `init_cache(batch, length) -> ComposedCache`
    - `vocab_size`, `max_positions` (the smallest of all the models': all see the same positions)
    encoder_mode: decode with the augmenting models seeing only the prefill (module docstring).
    """

    def __init__(self, ccfg: CompositionConfig, encoder_mode: bool = False):
        self.ccfg = ccfg
        self.encoder_mode = encoder_mode
        self.vocab_size = ccfg.anchor.vocab_size
        self.max_positions = min(c.max_positions for c in (ccfg.anchor, *ccfg.augments))

    def apply(self, params, tokens_BxT, mask_BxT=None, cache=None, *, augment_mask_BxT=None) -> LMOutput:
        return composed_forward(self.ccfg, params, tokens_BxT, mask_BxT, cache, self.encoder_mode, augment_mask_BxT)

    def init_cache(self, batch: int, length: int) -> ComposedCache:
        return init_composed_cache(self.ccfg, batch, length)
