"""m_B trained on Numeric-Arithmetic with a random-length prefix of random characters (p=0.75, 1-16 chars):
how well it computes after a KV-Arithmetic prompt, with and without the [NUM] marker.

    python results/kv_arithmetic/diagnostics/robust_anchor.py --save /tmp/mb_noise.pkl
"""
from _common import *
import argparse, pickle
p = argparse.ArgumentParser()
p.add_argument('--D', type=int, default=96); p.add_argument('--L', type=int, default=4); p.add_argument('--H', type=int, default=4)
p.add_argument('--steps', type=int, default=1750); p.add_argument('--lr', type=float, default=3e-3); p.add_argument('--bs', type=int, default=64)
p.add_argument('--nkv', type=int, default=99); p.add_argument('--T', type=int, default=40); p.add_argument('--maxnoise', type=int, default=16)
p.add_argument('--pnoise', type=float, default=0.75); p.add_argument('--save')
a = p.parse_args()
d = kv_task.make_kv_data(kv_task.KVTaskConfig(n_kv=a.nkv, fixed_width=True, scratchpad=True))
tok = kv_task.make_tokenizer()
cfg = cfg_for(a.D, a.L, a.H, V=len(tok))
params = model.init_params(cfg, jax.random.key(2))
print('params', sum(x.size for x in jax.tree.leaves(params)))
sched = optax.warmup_cosine_decay_schedule(0, a.lr, 100, a.steps, a.lr*0.05)
opt = optax.adamw(sched, b2=0.98, weight_decay=0.0)
st = opt.init(params)
@jax.jit
def step(params, st, toks, mask, flags):
    l, g = jax.value_and_grad(lambda p: lm_loss(model.forward(cfg, p, toks, mask).logits_BxTxV, toks, flags))(params)
    u, st = opt.update(g, st, params)
    return optax.apply_updates(params, u), st, l
@jax.jit
def ev(params, toks, mask, flags):
    return exact(model.forward(cfg, params, toks, mask).logits_BxTxV, toks, flags)
NOISE = list(kv_task.CHARS) + list(kv_task.MARKERS.values())
rng = np.random.default_rng(0)
def noise():
    if rng.random() > a.pnoise: return ""
    n = int(rng.integers(1, a.maxnoise + 1))
    return "".join(NOISE[j] for j in rng.integers(0, len(NOISE), n))
exprs = d.train_expressions(16000)
ea = d.eval_all
evs = {'num': batchify(tok, d.records(ea, 'numeric_arithmetic'), a.T),
       'kva_ctx': batchify(tok, [{"prompt": f"[KVA]{d.key_text(e)}={d.numeric_text(e)}=", "target": d.result_text(e)} for e in ea], a.T),
       'kva_ctx_num': batchify(tok, [{"prompt": f"[KVA]{d.key_text(e)}=[NUM]{d.numeric_text(e)}=", "target": d.result_text(e)} for e in ea], a.T)}
t0 = time.time()
for i in range(a.steps):
    idx = rng.integers(0, len(exprs), a.bs)
    recs = []
    for j in idx:
        r = d.record(exprs[j], 'numeric_arithmetic')
        recs.append({"prompt": noise() + r["prompt"], "target": r["target"]})
    params, st, l = step(params, st, *batchify(tok, recs, a.T))
    if i % 250 == 0 or i == a.steps-1:
        print(i, f'{float(l):.4f}', {k: round(float(ev(params, *v).mean()), 3) for k, v in evs.items()}, f'{time.time()-t0:.0f}s', flush=True)
if a.save: pickle.dump(jax.device_get(params), open(a.save, 'wb'))
