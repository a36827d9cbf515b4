#!/usr/bin/env bash
# The QuIP table: RTN, GPTQ and QuIP at 2, 3 and 4 bits on the default model, each scored on
# WikiText-2 test (context 512) and a second text. Quantized files and JSON reports go to OUT.
#
#   scripts/quant_table.sh OUT [MAX_WINDOWS] [SECOND_TEXT]
#
# MAX_WINDOWS (default: all) limits the windows of 512 scored per text. Calibration: WikiText-2
# valid (64 windows of 512 tokens, the `lmkit quantize` default), never the test text.
set -euo pipefail
out=${1:?usage: scripts/quant_table.sh OUT [MAX_WINDOWS] [SECOND_TEXT]}
max=${2:-}
second=${3:-}
data=${LMKIT_DATA:-../shared/data}
bin=${LMKIT_BIN:-target/release/lmkit}
mkdir -p "$out"
limit=()
[ -n "$max" ] && limit=(--max-windows "$max")
score() { # model tag
  "$bin" ppl "$data/wikitext-2/test.txt" --ctx 512 "${limit[@]}" -m "$1" --json > "$out/$2.ppl-wikitext.json"
  if [ -n "$second" ]; then
    "$bin" ppl "$second" --ctx 512 "${limit[@]}" -m "$1" --json > "$out/$2.ppl-second.json"
  fi
}
model=$("$bin" info --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["path"])')
[ -s "$out/f32.ppl-wikitext.json" ] || {
  "$bin" export --dequantize --type f32 --out "$out/f32.gguf"
  score "$out/f32.gguf" f32
}
for method in quip gptq rtn; do
  for bits in 4 3 2; do
    tag=$method$bits
    [ -s "$out/$tag.ppl-wikitext.json" ] && continue
    calib=()
    [ "$method" != rtn ] && calib=(--calib "$data/wikitext-2/valid.txt")
    "$bin" quantize --method "$method" --bits "$bits" "${calib[@]}" --out "$out/$tag.gguf" \
      --json > "$out/$tag.quant.json"
    score "$out/$tag.gguf" "$tag"
  done
done
echo "model: $model"
