"""Issue 11, session 14: can the text encoder's architecture bind a direction to its object at all? A fresh encoder
(T5's 8 buckets up to offset 128, or the recipe's 32 up to 32) and a linear head, trained together (Adam 1e-3, batch
64) to read each clause's direction from its colour word's encoding, on 2500 two-object captions; accuracy on 500
others. Both reach 1.00 (8 buckets: 0.81 after 200 steps, 32: 0.98): the encoder can bind; the teacher's diffusion
loss does not teach it to.

    python runs/probe_v14_binding.py
"""
import copy, torch, numpy as np
from streamgen_train import components as C
from streamgen_train.world.grammar import parse_caption, DIRECTIONS
from streamgen_train.world.scene import VideoWorld
from streamgen_train.data import EVAL_SEED
from transformers import UMT5EncoderModel
torch.set_num_threads(1)
tok = C.build_tokenizer(); world = VideoWorld(64, 64)
caps, p = [], 0
while len(caps) < 3000:
    c = world.clip((EVAL_SEED + 11, p), 1)[1]; p += 1
    if len(parse_caption(c).objects) == 2: caps.append(c)
ids = tok(caps, padding="max_length", max_length=32, return_tensors="pt")
names = list(DIRECTIONS)
pos, lab = [], []
for c in caps:
    m = [i for i, w in enumerate(c.split()) if w == "moving"]
    pos.append([k - 2 for k in m]); lab.append([names.index(o.direction) for o in parse_caption(c).objects])
pos, lab = torch.tensor(pos), torch.tensor(lab)
for buckets, dist in ((8, 128), (32, 32)):
    torch.manual_seed(0)
    enc = C.build_text_encoder(C.Sizes(), len(tok))
    cfg = copy.deepcopy(enc.config); cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance = buckets, dist
    enc = UMT5EncoderModel(cfg)
    head = torch.nn.Linear(64, 8)
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=1e-3)
    tr = slice(0, 2500); te = slice(2500, None)
    for step in range(600):
        b = torch.randint(0, 2500, (64,))
        h = enc(input_ids=ids.input_ids[b], attention_mask=ids.attention_mask[b]).last_hidden_state
        logits = head(h[torch.arange(64)[:, None], pos[b]])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), lab[b].flatten())
        opt.zero_grad(); loss.backward(); opt.step()
        if step % 200 == 199 or step == 599:
            with torch.no_grad():
                h = enc(input_ids=ids.input_ids[te], attention_mask=ids.attention_mask[te]).last_hidden_state
                acc = (head(h[torch.arange(len(h))[:, None], pos[te]]).argmax(-1) == lab[te]).float().mean().item()
            print(f"buckets {buckets} up to {dist}: step {step + 1} loss {loss.item():.3f} held-out {acc:.2f}", flush=True)
