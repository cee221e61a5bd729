"""Θ_C trained on the scratchpad format "[KVA]ab+cd=" -> "[NUM]07+22=+029" over held-in keys with the
two models above; reports teacher-forced exact match and the per-offset accuracy of the target.
DIAG=1: oracle cross-attention mask (each anchor token sees only the augmenting state at its own
position). CROPE=<theta>: another RoPE base for the cross-attention.

    python results/kv_arithmetic/diagnostics/copy_probe.py --mA /tmp/ma_num.pkl --mB /tmp/mb_noise.pkl --qn 1 --pairs 1:3
"""
from _common import *
import argparse, pickle
from calm_jax import composition as C
p = argparse.ArgumentParser()
p.add_argument('--pairs', default='0:1,1:3'); p.add_argument('--steps', type=int, default=600)
p.add_argument('--lr', type=float, default=3e-3); p.add_argument('--bs', type=int, default=64)
p.add_argument('--nkv', type=int, default=99); p.add_argument('--T', type=int, default=40); p.add_argument('--ndc', type=int, default=2000)
p.add_argument('--qn', type=int, default=0); p.add_argument('--zi', type=int, default=1); p.add_argument('--gate', type=int, default=0)
p.add_argument('--rope', type=int, default=1); p.add_argument('--heads', type=int, default=0)
p.add_argument('--mA', default='/tmp/ma_num.pkl'); p.add_argument('--mB', default='/tmp/mb_noise.pkl')
p.add_argument('--frac', type=float, default=0.2); p.add_argument('--wd', type=float, default=0.0); p.add_argument('--DB', type=int, default=96); p.add_argument('--LB', type=int, default=4)
a = p.parse_args()
d = kv_task.make_kv_data(kv_task.KVTaskConfig(n_kv=a.nkv, fixed_width=True, scratchpad=True, held_in_fraction=a.frac))
tok = kv_task.make_tokenizer()
cA = cfg_for(64, 2, 4, F=256, V=len(tok)); pA = pickle.load(open(a.mA, 'rb'))
cB = cfg_for(a.DB, a.LB, 4, V=len(tok)); pB = pickle.load(open(a.mB, 'rb'))
pairs = [tuple(map(int, s.split(':'))) for s in a.pairs.split(',')]
kw = dict(num_heads=a.heads) if a.heads else {}
ccfg = C.CompositionConfig(anchor=cB, augments=(cA,), connections=(tuple(pairs),), query_norm=bool(a.qn), zero_init_out=bool(a.zi), gate=bool(a.gate), cross_rope=bool(a.rope), **kw)
if os.environ.get("DIAG"):
    import types
    from calm_jax import masks as M
    shim = types.SimpleNamespace(**{k: getattr(M, k) for k in dir(M) if not k.startswith('__')})
    shim.attention_mask = lambda q, k, valid, *r, **kw: M.attention_mask(q, k, valid) & (q[:, None] == k[None, :])[None]
    C.masks = shim
if os.environ.get("CROPE"):
    import calm_jax.cross_attention as CA
    _orig = CA.default_inv_freq
    CA.default_inv_freq = lambda hd, th: _orig(hd, float(os.environ["CROPE"]))
frozen = {"anchor": pB, "augments": (pA,)}
def composed(th, toks, mask):
    return C.composed_forward(ccfg, {"theta": th, **frozen}, toks, mask).logits_BxTxV
th = C.init_theta(ccfg, jax.random.key(1))
print('theta', sum(x.size for x in jax.tree.leaves(th)))
sched = optax.warmup_cosine_decay_schedule(0, a.lr, 50, a.steps, a.lr*0.05)
opt = optax.adamw(sched, b2=0.98, weight_decay=a.wd); st = opt.init(th)
@jax.jit
def step(th, st, toks, mask, flags):
    l, g = jax.value_and_grad(lambda t: lm_loss(composed(t, toks, mask), toks, flags))(th)
    u, st = opt.update(g, st, th); return optax.apply_updates(th, u), st, l
@jax.jit
def ev(th, toks, mask, flags): return exact(composed(th, toks, mask), toks, flags)
rng = np.random.default_rng(0)
dc = d.train_expressions(a.ndc, held_in_only=True)
ho, ea = d.eval_heldout, d.eval_all
def copyrec(e): return {"prompt": f"[KVA]{d.key_text(e)}=", "target": "[NUM]" + d.numeric_text(e)}
def calcrec(e): return {"prompt": f"[KVA]{d.key_text(e)}=[NUM]{d.numeric_text(e)}=", "target": d.result_text(e)}
def kvarec(e): return {"prompt": f"[KVA]{d.key_text(e)}=", "target": f"[NUM]{d.numeric_text(e)}={d.result_text(e)}"}
evs = {'kva_ho': batchify(tok, [kvarec(e) for e in ho], a.T), 'copy_ho': batchify(tok, [copyrec(e) for e in ho], a.T),
       'calc_ho': batchify(tok, [calcrec(e) for e in ho], a.T), 'kva_dc': batchify(tok, [kvarec(e) for e in dc[:500]], a.T),
       'num': batchify(tok, d.records(ea, 'numeric_arithmetic'), a.T)}
t0 = time.time()
for i in range(a.steps):
    idx = rng.integers(0, len(dc), a.bs)
    th, st, l = step(th, st, *batchify(tok, [kvarec(dc[j]) for j in idx], a.T))
    if i % 200 == 0 or i == a.steps - 1:
        print(i, f'{float(l):.4f}', {k: round(float(ev(th, *v).mean()), 3) for k, v in evs.items()}, f'{time.time()-t0:.0f}s', flush=True)
@jax.jit
def preds(th, toks, mask):
    return composed(th, toks, mask)[:, :-1].argmax(-1)
toks, mask, flags = evs['kva_ho']
pr = np.asarray(preds(th, toks, mask)); tg = np.asarray(toks)[:, 1:]; f = np.asarray(flags)[:, 1:]
acc = np.zeros(16); cnt = np.zeros(16)
for r in range(len(pr)):
    idx = np.nonzero(f[r])[0]
    for o, j in enumerate(idx): acc[o] += pr[r, j] == tg[r, j]; cnt[o] += 1
print('per-offset acc', np.round(acc[cnt > 0] / cnt[cnt > 0], 3).tolist())
