"""Contact sheet of a real-looking clip extended by the shipped model at 1 and 4 steps (issue 17).

The clip is made by the ffmpeg tool (imageio-ffmpeg's build; not the project's PyAV encoder): a slow camera move
over a photograph no training stage saw (scikit-image's held-out `coffee`), 2 s at 24 fps, H.264 in MP4. It is
extended as a user would: `start_session(video=path, keep_input=True)`, so the clip is resampled to the stream's
16 fps, its last 33 frames are kept and shown as they are (resized), then the generated chunks follow. One row per
step count: the clip's own frames (left of the bar), then generated frames; a last row shows the VAE's
reconstruction of the clip, which is what the model continues. Writes docs/extension-sheet.png and
benchmarks/results/extension_sheet.json.

    python benchmarks/extension_sheet.py [--model DIR] [--chunks 3] [--seed 0] [--sheet PNG] [--out JSON]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import torch
from PIL import Image, ImageDraw
from skimage import data

from streamgen import StreamingPipeline
from streamgen.pipeline import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parent.parent
SHEET = ROOT / "docs" / "extension-sheet.png"
RESULT = ROOT / "benchmarks" / "results" / "extension_sheet.json"
SCALE = 2  # pixels per stream pixel in the sheet
CLIP_SHOWN = 6  # of the clip's kept frames, evenly spaced, ending with its last
GENERATED_SHOWN = 10


def make_clip(path: Path) -> None:
    """2 s at 24 fps: ffmpeg's zoompan moving over the photograph, encoded by ffmpeg's libx264."""
    photo = path.with_suffix(".png")
    Image.fromarray(data.coffee()).save(photo)
    move = "zoompan=z='1.2+0.004*on':x='iw/2-iw/zoom/2+on*2':y='ih/2-ih/zoom/2':d=48:s=320x240:fps=24"
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-i", str(photo), "-vf", move,
               "-frames:v", "48", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "20", str(path)]  # fmt: skip
    subprocess.run(command, check=True)


def extend(
    pipe: StreamingPipeline, clip: Path, steps: int, chunks: int, seed: int, prompt: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The clip's kept frames as shown, the VAE's reconstruction of them (what the model continues), and the
    generated frames, at `steps`."""
    extension = pipe.prepare(video=clip)
    reconstruction = extension.reconstruction
    with pipe.start_session(prompt, video=extension, keep_input=True, steps=steps, seed=seed) as session:
        generated = np.concatenate([session.next_chunk() for _ in range(chunks)])
        return session.context_frames, reconstruction, generated


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b) ** 2).mean())
    return 10 * np.log10(255**2 / mse) if mse else float("inf")


def pick(frames: np.ndarray, count: int) -> np.ndarray:
    """`count` frames evenly spaced, the last one included."""
    return frames[np.linspace(0, len(frames) - 1, count).round().astype(int)]


def sheet(rows: list[tuple[str, np.ndarray, np.ndarray]]) -> Image.Image:
    size = rows[0][1].shape[1] * SCALE
    gap, label = 6, 16
    width = (CLIP_SHOWN + GENERATED_SHOWN) * size + gap
    canvas = Image.new("RGB", (width, len(rows) * (size + label)), "white")
    draw = ImageDraw.Draw(canvas)
    for row, (title, own, generated) in enumerate(rows):
        top = row * (size + label)
        draw.text((2, top + 2), title, fill="black")
        tiles = [*pick(own, CLIP_SHOWN), *pick(generated, GENERATED_SHOWN)]
        for i, tile in enumerate(tiles):
            left = i * size + (gap if i >= CLIP_SHOWN else 0)
            canvas.paste(Image.fromarray(tile).resize((size, size), Image.Resampling.NEAREST), (left, top + label))
        draw.rectangle([CLIP_SHOWN * size, top + label, CLIP_SHOWN * size + gap - 1, top + label + size], fill="red")
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--sheet", type=Path, default=SHEET, help="the contact sheet (PNG)")
    parser.add_argument("--out", type=Path, default=RESULT, help="the figures (JSON)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = StreamingPipeline.from_pretrained(args.model, device="cpu")
    prompt = pipe.example_prompts[0] if pipe.example_prompts else "a cup of coffee on a table"
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "coffee.mp4"
        make_clip(clip)
        results = {steps: extend(pipe, clip, steps, args.chunks, args.seed, prompt) for steps in (1, 4)}
    rows = []
    report = {"prompt": prompt, "seed": args.seed, "chunks": args.chunks, "rows": []}
    for steps, (own, reconstruction, generated) in results.items():
        # Mean absolute step (0-255) from the clip's last frame, and from its reconstruction's, to the first
        # generated frame: the model continues the reconstruction, so a poor one shows as a jump from the clip.
        report["rows"].append({
            "steps": steps, "clip_frames": len(own), "generated_frames": len(generated),
            "join_from_clip": round(float(np.abs(generated[0].astype(int) - own[-1]).mean()), 2),
            "join_from_reconstruction": round(float(np.abs(generated[0].astype(int) - reconstruction[-1]).mean()), 2),
            "reconstruction_psnr_db": round(psnr(own, reconstruction), 2),
        })  # fmt: skip
        rows.append((f"{steps} step{'s' if steps > 1 else ''}: the clip's last {len(own)} frames (6 shown) | "
                     f"{len(generated)} generated (10 shown)", own, generated))  # fmt: skip
    rows.append(("the model's reconstruction of the same clip frames (what it continues), then the 4-step row's",
                 results[4][1], results[4][2]))  # fmt: skip
    for path in (args.sheet, args.out):
        path.parent.mkdir(parents=True, exist_ok=True)
    sheet(rows).save(args.sheet)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    print(f"wrote {args.sheet}")


if __name__ == "__main__":
    main()
