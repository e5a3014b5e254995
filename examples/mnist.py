"""What dropout does against overfitting, on the classic PyTorch MNIST CNN.

The unchanged model definition (nn.Dropout layers) is converted with
fastdropout.replace_dropout, then trained twice: with dropout, and with dropout removed.
Per epoch it prints train/test loss and accuracy and the generalisation gap, and it writes a PNG
of the curves.

    python examples/mnist.py                    # scikit-learn's 1,797 digits, no download
    python examples/mnist.py --data ~/mnist     # MNIST IDX files (train-images-idx3-ubyte, ...)

Without --data it uses the handwritten digits bundled with scikit-learn (real 8x8 scans,
upsampled to 28x28): small enough to overfit, and about a minute on two CPU cores.
"""
from __future__ import annotations

import argparse
import gzip
import os
import struct
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fastdropout


class Net(nn.Module):
    """pytorch/examples' MNIST network, unchanged: it uses torch's own dropout modules."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return F.log_softmax(self.fc2(x), dim=1)


def read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        zero, dtype, ndim = struct.unpack(">HBB", f.read(4))
        if zero != 0 or dtype != 0x08:
            raise ValueError(f"{path}: not an unsigned-byte IDX file")
        shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(shape)


def find(directory: str, stem: str) -> str:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"{stem}[.gz] not found in {directory}")


def load_mnist(directory: str, limit: int):
    def images(stem):
        return torch.from_numpy(read_idx(find(directory, stem)).copy()).float().div(255).unsqueeze(1)

    def labels(stem):
        return torch.from_numpy(read_idx(find(directory, stem)).astype(np.int64))

    xtr, ytr = images("train-images-idx3-ubyte"), labels("train-labels-idx1-ubyte")
    xte, yte = images("t10k-images-idx3-ubyte"), labels("t10k-labels-idx1-ubyte")
    return xtr[:limit], ytr[:limit], xte[:limit], yte[:limit], "MNIST"


def load_digits(seed: int):
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.from_numpy(d.images).float().div(16).unsqueeze(1)            # 1797 x 1 x 8 x 8
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    y = torch.from_numpy(d.target).long()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_train = 1000
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:], "scikit-learn digits (8x8 scans upsampled to 28x28)"


def progress(iterable, total, desc):
    try:
        from tqdm import tqdm
        return tqdm(iterable, total=total, desc=desc, leave=False)
    except ImportError:
        return iterable


def evaluate(model, x, y, batch=500):
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out = model(x[i:i + batch])
            loss += F.nll_loss(out, y[i:i + batch], reduction="sum").item()
            correct += (out.argmax(1) == y[i:i + batch]).sum().item()
    return loss / len(x), correct / len(x)


def train(label, model, data, epochs, batch, lr, seed):
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    opt = torch.optim.Adadelta(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(xtr))
        steps = range(0, len(xtr), batch)
        t0 = time.perf_counter()
        for i in progress(steps, len(steps), f"{label} epoch {epoch}"):
            idx = perm[i:i + batch]
            loss = F.nll_loss(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        tr_loss, tr_acc = evaluate(model, xtr, ytr)
        te_loss, te_acc = evaluate(model, xte, yte)
        history.append(dict(epoch=epoch, train_loss=tr_loss, train_acc=tr_acc, test_loss=te_loss, test_acc=te_acc))
        print(f"{label:<18} epoch {epoch:2d}  train loss {tr_loss:.4f} acc {tr_acc:6.2%}   "
              f"test loss {te_loss:.4f} acc {te_acc:6.2%}   gap {tr_acc - te_acc:+6.2%}   "
              f"({time.perf_counter() - t0:.1f}s)", flush=True)
    return history


def remove_dropout(model: nn.Module) -> nn.Module:
    for name, child in model.named_children():
        if isinstance(child, nn.modules.dropout._DropoutNd):
            setattr(model, name, nn.Identity())
        else:
            remove_dropout(child)
    return model


def plot(histories, path, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (label, hist), color in zip(histories.items(), ("tab:blue", "tab:red")):
        ep = [h["epoch"] for h in hist]
        ax1.plot(ep, [h["train_loss"] for h in hist], "--", color=color, label=f"{label} train")
        ax1.plot(ep, [h["test_loss"] for h in hist], "-", color=color, label=f"{label} test")
        ax2.plot(ep, [h["train_acc"] for h in hist], "--", color=color, label=f"{label} train")
        ax2.plot(ep, [h["test_acc"] for h in hist], "-", color=color, label=f"{label} test")
    ax1.set(xlabel="epoch", ylabel="NLL loss", title="loss")
    ax2.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="directory with the MNIST IDX files")
    ap.add_argument("--limit", type=int, default=10000, help="examples per split taken from MNIST")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--plot", default="mnist_dropout.png")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    if args.data:
        xtr, ytr, xte, yte, source = load_mnist(args.data, args.limit)
    else:
        xtr, ytr, xte, yte, source = load_digits(args.seed)
    mean, std = xtr.mean(), xtr.std()
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    print(f"data: {source}: {len(xtr)} train, {len(xte)} test; torch {torch.__version__}, "
          f"fastdropout {fastdropout.__version__}")

    histories = {}
    torch.manual_seed(args.seed)
    with_dropout = Net()
    replaced = []
    fastdropout.replace_dropout(with_dropout, replaced=replaced)
    print(f"replace_dropout swapped {len(replaced)} modules: {', '.join(replaced)}")
    histories["with dropout"] = train("with dropout", with_dropout, (xtr, ytr, xte, yte),
                                      args.epochs, args.batch, args.lr, args.seed)
    torch.manual_seed(args.seed)
    without = remove_dropout(Net())
    histories["without dropout"] = train("without dropout", without, (xtr, ytr, xte, yte),
                                         args.epochs, args.batch, args.lr, args.seed)

    print("\nfinal epoch:")
    for label, hist in histories.items():
        h = hist[-1]
        print(f"  {label:<16} train acc {h['train_acc']:6.2%}  test acc {h['test_acc']:6.2%}  "
              f"gap {h['train_acc'] - h['test_acc']:+6.2%}  test loss {h['test_loss']:.4f}")
    plot(histories, args.plot, f"MNIST CNN on {source}: dropout vs none")


if __name__ == "__main__":
    main()
