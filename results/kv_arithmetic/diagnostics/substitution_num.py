"""m_A trained on KV-Substitution whose target carries the [NUM] marker ("[SUB]ab+cd=" -> "[NUM]07+22"),
so that the scratchpad the anchor copies starts the way m_B's problems start.

    python results/kv_arithmetic/diagnostics/substitution_num.py --save /tmp/ma_num.pkl
"""
from _common import *
import argparse, pickle
p = argparse.ArgumentParser()
p.add_argument('--D', type=int, default=64); p.add_argument('--L', type=int, default=2); p.add_argument('--H', type=int, default=4)
p.add_argument('--steps', type=int, default=1000); p.add_argument('--lr', type=float, default=5e-3); p.add_argument('--bs', type=int, default=64)
p.add_argument('--nkv', type=int, default=99); p.add_argument('--T', type=int, default=32); p.add_argument('--save')
a = p.parse_args()
d = kv_task.make_kv_data(kv_task.KVTaskConfig(n_kv=a.nkv, fixed_width=True, scratchpad=True))
tok = kv_task.make_tokenizer()
cfg = cfg_for(a.D, a.L, a.H, F=4*a.D, V=len(tok))
params = model.init_params(cfg, jax.random.key(1))
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
def rec(e, m='[SUB]'): return {"prompt": f"{m}{d.key_text(e)}=", "target": "[NUM]" + d.numeric_text(e)}
exprs = d.train_expressions(16000)
evs = {'sub': batchify(tok, [rec(e) for e in d.eval_all], a.T), 'sub_kva': batchify(tok, [rec(e, '[KVA]') for e in d.eval_heldout], a.T)}
rng = np.random.default_rng(0); t0 = time.time()
for i in range(a.steps):
    idx = rng.integers(0, len(exprs), a.bs)
    params, st, l = step(params, st, *batchify(tok, [rec(exprs[j]) for j in idx], a.T))
    if i % 250 == 0 or i == a.steps-1:
        print(i, f'{float(l):.4f}', {k: round(float(ev(params, *v).mean()), 3) for k, v in evs.items()}, f'{time.time()-t0:.0f}s', flush=True)
if a.save: pickle.dump(jax.device_get(params), open(a.save, 'wb'))
