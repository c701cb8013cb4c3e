#!/usr/bin/env bash
# Set up ComfyUI 0.33.0 for the tests that run our pack on current ComfyUI as well as 0.3.75.
# ComfyUI is not on the package index: its source comes from ../shared/comfyui/ComfyUI-0.33.0.tar.gz.
# It gets a virtual environment of its own (.venv-comfy033), since its pins (frontend 1.49.6, av>=16,
# comfy-aimdo, comfy-kitchen) differ from 0.3.75's. Re-running is cheap: an up-to-date set-up is kept.
# Without the tarball it says so and exits 0; the 0.33 tests then skip with the same message.
set -euo pipefail
cd "$(dirname "$0")/.."
tarball="${EASYANIMATE_COMFYUI_033_TARBALL:-../shared/comfyui/ComfyUI-0.33.0.tar.gz}"
root=.comfyui-0.33
venv=.venv-comfy033
if [ ! -f "$tarball" ]; then
    echo "ComfyUI 0.33.0 source $tarball is absent: the ComfyUI 0.33 tests will skip"
    exit 0
fi
stamp="$root/.ready"
want="$(sha256sum "$tarball" | cut -c1-16) $(sha256sum requirements.txt | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
    echo "ComfyUI 0.33.0 already set up in $root and $venv"
    exit 0
fi
rm -rf "$root" "$venv"
mkdir -p "$root"
tar xzf "$tarball" -C "$root"
[ -x .venv/bin/python ] || { echo "run the README's install command first (.venv is missing)" >&2; exit 1; }
python3 -m venv "$venv"
# torch, torchvision and every package whose version both ComfyUIs accept come from .venv (a .pth
# entry placed after this venv's own site-packages): no second multi-GB torch. What 0.33 pins
# differently is installed here and shadows .venv's copy (pip leaves the copy "outside environment").
base_site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
own_site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$base_site" > "$own_site/zz_easyanimate_base_venv.pth"
grep -v -i -E '^(torch|torchvision|torchaudio)([<>=~ ]|$)' "$root/ComfyUI/requirements.txt" > "$root/requirements-no-torch.txt"
"$venv/bin/pip" install -q -r "$root/requirements-no-torch.txt" -r requirements.txt
# 0.33 imports torchaudio at start-up; its newest release (2.11.1, "torch>=2.11", stable ABI) loads
# with .venv's torch 2.14.1. --no-deps keeps pip from replacing torch.
"$venv/bin/pip" install -q --no-deps torchaudio==2.11.1
echo "$want" > "$stamp"
echo "ComfyUI 0.33.0 set up in $root and $venv"
