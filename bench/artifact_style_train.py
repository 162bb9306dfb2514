"""The baseline for `bench_fleet.py`: one plain PyTorch training script per model, in the style of
the SpinML artifact's classifier script (written for this benchmark, not taken from it).

Images are read from `DATA/{label}/*.png` and decoded, resized and converted on every access by a
`Dataset` with torchvision transforms; 90/10 random split; MobileNetV2 with a new head; Adam;
validation after every epoch (batch 4); the best model is saved with `torch.save`. It runs as its
own process, one after another, as the artifact's shell loop runs it.

    python bench/artifact_style_train.py DATA OUT [--epochs 5] [--batch-size 128] [--image-size 224]
                                         [--channels-last]

`--channels-last` lays the model out NHWC as the fleet's models are (not in the artifact's style):
it separates what the layout gains from what the fleet gains.
"""

from __future__ import annotations

import argparse
import os

import torch
import torchvision
from PIL import Image
from torchvision import transforms


class Folder(torch.utils.data.Dataset):
    def __init__(self, root: str, transform):
        self.labels = sorted(os.listdir(root))
        self.files = [(os.path.join(root, label, name), index) for index, label in enumerate(self.labels)
                      for name in sorted(os.listdir(os.path.join(root, label)))]
        self.transform = transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        path, label = self.files[index]
        return self.transform(Image.open(path).convert("RGB")), label


def accuracy(model, loader, device) -> float:
    model.eval()
    right = total = 0
    with torch.no_grad():
        for images, labels in loader:
            right += int((model(images.to(device)).argmax(1).cpu() == labels).sum())
            total += len(labels)
    return right / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    transform = transforms.Compose([transforms.Resize((args.image_size, args.image_size)), transforms.ToTensor()])
    dataset = Folder(args.data, transform)
    n_train = int(0.9 * len(dataset))
    train_set, val_set = torch.utils.data.random_split(dataset, [n_train, len(dataset) - n_train])
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=4)
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=len(dataset.labels)).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    best = -1.0
    for _ in range(args.epochs):
        model.train()
        for images, labels in train_loader:
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(images.to(device)), labels.to(device))
            loss.backward()
            optimizer.step()
        score = accuracy(model, val_loader, device)
        if score > best:
            best = score
            torch.save(model.state_dict(), args.out)


if __name__ == "__main__":
    main()
