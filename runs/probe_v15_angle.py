"""Issue 11, session 15: how far off is the direction the teacher draws? For 64 held-out prompts, after each clip's
clean first frame, chunk 1 from pure noise (16 Euler steps, guided at 2: `benchmarks/direction.py`'s row "from
sigma 1.00"), the angle between each found object's fitted motion (frames 1-12) and its captioned direction, and
its speed in pixels a frame, by captioned speed; the VAE round trip of the same clips beside it.

    python runs/probe_v15_angle.py RUN
"""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, "benchmarks")
from direction import CHUNKS, DIRECTIONS, EVAL_SEED, FIRST, SinkWindow, StreamConfig, StreamingEngine, \
    StreamingPipeline, TextCondition, VideoWorld, analyse, decode, encode_video, load, parse_caption, stages
torch.set_num_threads(1)
run = Path(sys.argv[1])
tokenizer, encoder, vae, teacher, models = load(run, ["teacher-euler"])
scheduler = stages.C.build_scheduler()
engine = StreamingEngine(teacher, scheduler)
pipe = StreamingPipeline(teacher, vae, scheduler, encoder, tokenizer)
world = VideoWorld(64, 64); stride = pipe.latent_scale[0]
clips = [world.clip((EVAL_SEED, p), 1 + stride * (FIRST - 1)) for p in range(64)]
caps = [c for _, c in clips]
x0 = torch.cat([encode_video(vae, v).float() for v, _ in clips]); first, rest = x0.split([CHUNKS[0], CHUNKS[1]], dim=1)
gen = torch.Generator().manual_seed(0); noise = torch.randn(rest.shape, generator=gen)
emb = torch.cat([pipe.encode_prompt(c) for c in caps]); text = TextCondition(emb, pipe.encode_prompt("").expand_as(emb), 2.0)
cache = engine.new_cache(tuple(x0.shape[-2:]), max(CHUNKS), SinkWindow(1, StreamConfig().window))
with torch.no_grad():
    engine.commit(cache, first, text); chunk = engine.denoise(cache, noise, text, 16, 0)
    vids = decode(vae, torch.cat([first, chunk], 1)); vae_vids = decode(vae, x0)
def vel(frames, obj):
    f = next((d for d in analyse(frames) if d.colour == obj.colour), None)
    if f is None: return None
    t = f.track[1:]; s = np.flatnonzero(np.isfinite(t).all(1))
    return None if len(s) < 2 else np.polyfit(s, t[s], 1)[0]
for name, vs in (("vae", vae_vids), ("teacher", vids)):
    rows = []
    for v, c in zip(vs, caps):
        for o in parse_caption(c).objects:
            u = vel(v, o)
            if u is None: continue
            want = np.array(DIRECTIONS[o.direction]); ang = np.degrees(np.arctan2(u[1], u[0]) - np.arctan2(want[1], want[0]))
            ang = (ang + 180) % 360 - 180
            rows.append((o.speed, len(parse_caption(c).objects), abs(ang), np.hypot(*u)))
    for sp in ("slow", "fast"):
        a = np.array([r[2] for r in rows if r[0] == sp]); m = np.array([r[3] for r in rows if r[0] == sp])
        print(name, sp, "n", len(a), "median |angle err|", round(np.median(a)), "share <22.5", round((a < 22.5).mean(), 2), "<45", round((a < 45).mean(), 2), ">135", round((a > 135).mean(), 2), "median px/frame", round(np.median(m), 2))
