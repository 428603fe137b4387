"""What each per-step extra of the trainer costs, against a bare forward/backward/AdamW step.

In one process, rounds interleaved: bare, + gradient clipping (with its finiteness check), + EMA,
+ dynamic binarisation, and all three (what `train` does by default). Same model and batch as
bench/train_speed.py. Prints a table and writes JSON.

    .venv/bin/python bench/step_components.py [--out bench/results/step_components.json]
"""
import argparse, json, os, statistics
import copy, time, torch
from train.config import build_config
from train.model import build_model
from train.loss import vae_loss, training_objective
from train.state import update_ema
torch.manual_seed(0)
cfg = build_config({})
model = build_model(cfg.model); ema = copy.deepcopy(model).requires_grad_(False)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x8 = torch.randint(0, 256, (128, 1, 28, 28), dtype=torch.uint8)
g = torch.Generator().manual_seed(0)
def step(clip, do_ema, binar, i):
    x = x8.float().div_(255)
    if binar: x = torch.bernoulli(x, generator=g)
    params, post = model(x, g)
    loss = training_objective(vae_loss(params, x, post, model.likelihood), post, beta=1.0, free_bits=0.0)
    opt.zero_grad(set_to_none=True); loss.backward()
    if clip:
        n = torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0); bool(torch.isfinite(n))
    opt.step()
    if do_ema: update_ema(ema, model, i, 0.999)
variants = {"bare": (0,0,0), "+clip": (1,0,0), "+ema": (0,1,0), "+binarize": (0,0,1), "all": (1,1,1)}
res = {k: [] for k in variants}
for rnd in range(4):
    for k, v in variants.items():
        for i in range(5): step(*v, i)
        t = time.perf_counter()
        for i in range(40): step(*v, i)
        res[k].append(40*128/(time.perf_counter()-t))
summary = {k: round(statistics.median(r), 1) for k, r in res.items()}
for k, v in summary.items():
    print(f"{k:10s} {v:7.0f} samples/s  {100 * (1 - v / summary['bare']):5.1f}% below bare")
parser = argparse.ArgumentParser()
parser.add_argument("--out", default="bench/results/step_components.json")
out = parser.parse_args().out
with open(out, "w") as f:
    json.dump({"samples_per_s": summary, "load": os.getloadavg()}, f, indent=2)
print("wrote", out)
