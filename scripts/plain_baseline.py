"""
The plain PyTorch script that README "Recipe search" compares tune.py's recipe with: what a competent user writes
in 40 lines. ResNet-18 from scratch, RandomResizedCrop(scale 0.6-1) + horizontal flip, the model's own linear head,
cross-entropy, AdamW with a cosine schedule, no validation; then test/ is predicted into a prediction.csv.

    python scripts/plain_baseline.py --data-dir data/digits-32 --epochs 15 --output plain.csv
"""
import argparse
import os
import time

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision import transforms as T

p = argparse.ArgumentParser(description="A plain ResNet-18 training script, the baseline of the recipe search.")
p.add_argument("--data-dir", required=True, help="dataset root with train/<class>/ and a flat test/")
p.add_argument("--epochs", type=int, default=15, help="(default: %(default)s)")
p.add_argument("--img-size", type=int, default=32, help="(default: %(default)s)")
p.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: %(default)s)")
p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
p.add_argument("--output", default="prediction.csv", help="(default: %(default)s)")
args = p.parse_args()
if not os.path.isdir(os.path.join(args.data_dir, "train")) or not os.path.isdir(os.path.join(args.data_dir, "test")):
    p.error(f"--data-dir {args.data_dir}: needs train/<class>/ and test/ folders")
if min(args.epochs, args.img_size, args.batch_size) < 1:
    p.error("--epochs, --img-size and --batch-size must be at least 1")
torch.manual_seed(args.seed)

normalize = T.Normalize([0.5] * 3, [0.5] * 3)
train_tf = T.Compose([T.RandomResizedCrop(args.img_size, scale=(0.6, 1)), T.RandomHorizontalFlip(), T.ToTensor(),
                      normalize])
test_tf = T.Compose([T.Resize((args.img_size, args.img_size)), T.ToTensor(), normalize])
train_set = torchvision.datasets.ImageFolder(os.path.join(args.data_dir, "train"), train_tf)
loader = torch.utils.data.DataLoader(train_set, args.batch_size, shuffle=True, drop_last=True)
model = torchvision.models.resnet18(num_classes=len(train_set.classes))
optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * len(loader))

start = time.time()
for epoch in range(args.epochs):
    model.train()
    for images, labels in loader:
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    print(f"epoch {epoch + 1}/{args.epochs}  loss {loss.item():.3f}  {time.time() - start:.0f} s", flush=True)
print(f"training took {time.time() - start:.1f} s")

model.eval()
test_dir = os.path.join(args.data_dir, "test")
names = sorted(os.listdir(test_dir))
with torch.no_grad(), open(args.output, "w") as f:
    f.write("image_name,pred_label\n")
    for i in range(0, len(names), 256):
        batch = torch.stack([test_tf(Image.open(os.path.join(test_dir, n)).convert("RGB")) for n in names[i:i + 256]])
        for name, c in zip(names[i:i + 256], model(batch).argmax(1).tolist()):
            f.write(f"{os.path.splitext(name)[0]},{train_set.classes[c]}\n")
