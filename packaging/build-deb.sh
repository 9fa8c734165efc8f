#!/usr/bin/env bash
# Build the pdoflowd Debian package: packaging/build-deb.sh [OUTPUT_DIR]
#
# dpkg-buildpackage wants debian/ at the top of the source tree, and writes
# next to it. So the tree is copied to a temporary directory (the files git
# knows of plus untracked ones that are not ignored, as they are in the
# working tree), packaging/debian becomes debian/ there, the sysusers.d and
# tmpfiles.d entries become debian/pdoflowd.{sysusers,tmpfiles}, and the
# .deb, .buildinfo and .changes land in OUTPUT_DIR (default: dist/). Nothing
# is written into the source tree except OUTPUT_DIR.
#
# Debian's own python3 builds it: PATH is reset so that no pyenv shim or
# virtual environment shadows /usr/bin/python3.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
out="$(mkdir -p "${1:-$root/dist}" && cd "${1:-$root/dist}" && pwd)"

work="$(mktemp -d "${TMPDIR:-/tmp}/pdoflowd-deb.XXXXXX")"
trap 'rm -rf "$work"' EXIT
src="$work/pdoflowd"
mkdir "$src"

if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
	# Deleted-but-tracked files are skipped; everything else is copied as it
	# is in the working tree.
	(cd "$root" && git ls-files -z --cached --others --exclude-standard |
		while IFS= read -r -d '' path; do
			[ -e "$path" ] && printf '%s\0' "$path"
		done | tar --null --files-from=- --create --file=-) |
		tar --extract --file=- --directory="$src"
else
	tar --create --file=- --directory="$root" --exclude-vcs \
		--exclude=./.venv --exclude=./dist --exclude=./build \
		--exclude='*.egg-info' --exclude=__pycache__ . |
		tar --extract --file=- --directory="$src"
fi

if [ -e "$src/debian" ]; then
	echo "build-deb: the source tree has a debian/ of its own; refusing" >&2
	exit 1
fi
cp -a "$root/packaging/debian" "$src/debian"
cp "$root/packaging/sysusers.d/pdoflowd.conf" "$src/debian/pdoflowd.sysusers"
cp "$root/packaging/tmpfiles.d/pdoflowd.conf" "$src/debian/pdoflowd.tmpfiles"

clean_env=(env -i HOME="${HOME:-/root}" LC_ALL=C.UTF-8
	PATH=/usr/sbin:/usr/bin:/sbin:/bin
	DEB_BUILD_OPTIONS="${DEB_BUILD_OPTIONS:-}")

upstream="$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$src/pdoflowd/__init__.py")"
packaged="$(cd "$src" && "${clean_env[@]}" dpkg-parsechangelog -S Version)"
if [ "${packaged%%-*}" != "$upstream" ]; then
	echo "build-deb: packaging/debian/changelog is at $packaged but" \
		"pdoflowd.__version__ is $upstream; add a changelog entry" \
		"(dch -v $upstream) first" >&2
	exit 1
fi

(cd "$src" && "${clean_env[@]}" dpkg-buildpackage -us -uc -b)

shopt -s nullglob
built=("$work"/pdoflowd_*.deb)
if [ "${#built[@]}" -ne 1 ]; then
	echo "build-deb: expected one .deb, found ${#built[@]}" >&2
	exit 1
fi
mv "$work"/pdoflowd_*.deb "$work"/pdoflowd_*.buildinfo \
	"$work"/pdoflowd_*.changes "$out"/
echo "build-deb: $out/$(basename "${built[0]}")"
