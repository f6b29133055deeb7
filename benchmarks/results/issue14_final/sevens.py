"""A final run's lost mode: its 10 labeled 7s and 2s, test 7s it calls 7, and 40 it calls 2.

    python benchmarks/results/issue14_final/sevens.py OUT.png [SEED]     (from the repository root; SEED 103)
"""
import json, sys
import numpy as np, torch
from PIL import Image, ImageDraw
import sgan
from sgan.data import read_builtin_split

seed = sys.argv[2] if len(sys.argv) > 2 else "103"
run = f"runs/paper/salimans/runs/mnist/salimans/labels-100/seed-{seed}"
xtr, ytr = read_builtin_split("mnist", train=True, root="data")
xte, yte = read_builtin_split("mnist", train=False, root="data")
idx = torch.tensor(json.load(open(f"{run}/labeled_indices.json"))["indices"])
lab7 = xtr[idx][ytr[idx] == 7]; lab2 = xtr[idx][ytr[idx] == 2]
clf = sgan.load_classifier(run)
pred = torch.tensor([int(c) for c in clf.predict(xte)])
wrong = xte[(yte == 7) & (pred == 2)]
right = xte[(yte == 7) & (pred == 7)]
print("test 7s called 2:", len(wrong), "of", int((yte == 7).sum()))

def row(images, n):
    tiles = [np.pad(im[0].numpy(), 1, constant_values=128) for im in images[:n]]
    tiles += [np.full((30, 30), 255, np.uint8)] * (n - len(tiles))
    return np.concatenate(tiles, axis=1)

n = 20
rows = [("labeled 7s", row(lab7, n)), ("labeled 2s", row(lab2, n)), ("test 7s called 7", row(right, n)),
        ("test 7s called 2", row(wrong, n)), ("(more)", row(wrong[n:], n))]
scale, label_w = 3, 170
h = len(rows) * 30 * scale
canvas = Image.new("L", (label_w + n * 30 * scale, h), 255)
draw = ImageDraw.Draw(canvas)
from PIL import ImageFont
font = ImageFont.load_default(size=18)
for i, (name, pixels) in enumerate(rows):
    canvas.paste(Image.fromarray(pixels).resize((pixels.shape[1] * scale, 30 * scale), Image.NEAREST), (label_w, i * 30 * scale))
    draw.text((8, i * 30 * scale + 35), name, fill=0, font=font)
canvas.save(sys.argv[1])
print("wrote", sys.argv[1])
