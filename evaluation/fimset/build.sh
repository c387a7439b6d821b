#!/usr/bin/env bash
# Rebuild difill's FIM set (evaluation/fimset/*.jsonl) from pinned, permissively licensed
# sources that the training corpus never sees. See PROVENANCE.md for what and why.
#
#   bash evaluation/fimset/build.sh            # needs pip, npm and (as root) apt-get
#
# Mining is seeded: the same sources and seeds give the same cases, byte for byte.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
src=${FIMSET_SRC:-$(mktemp -d -t difill-fimset-XXXXXX)}
mine() { python -m difill eval mine "$@" --prefix-chars 3000 --suffix-chars 1000; }
mkdir -p "$src/pypi" "$src/npm"

# Python: the three PyPI packages the corpus excludes by name (training/corpus.py EVAL_PACKAGES).
pip download -q --no-deps -d "$src/pypi" attrs==26.1.0 click==8.5.1 more-itertools==11.2.1
for name in attrs-26.1.0 click-8.5.1 more_itertools-11.2.1; do
  rm -rf "$src/$name"; python -m zipfile -e "$src"/pypi/"$name"-*.whl "$src/$name"
done
mine "$src/attrs-26.1.0" --language python --n 66 --seed 1 --label attrs-26.1.0 --out "$src/attrs.jsonl"
mine "$src/click-8.5.1" --language python --n 67 --seed 2 --label click-8.5.1 --out "$src/click.jsonl"
mine "$src/more_itertools-11.2.1" --language python --n 67 --seed 3 --label more-itertools-11.2.1 --out "$src/more.jsonl"
cat "$src/attrs.jsonl" "$src/click.jsonl" "$src/more.jsonl" > "$here/python.jsonl"

# JavaScript, TypeScript, TSX and Java: npm packages (their hand-written sources).
(cd "$src/npm" && npm pack --silent picomatch@4.0.2 mobx@6.13.5 react-native-webview@13.12.2 >/dev/null)
for tgz in picomatch-4.0.2 mobx-6.13.5 react-native-webview-13.12.2; do
  rm -rf "$src/$tgz"; mkdir -p "$src/$tgz"; tar xzf "$src/npm/$tgz.tgz" -C "$src/$tgz"
done
mine "$src/picomatch-4.0.2/package" --language javascript --n 50 --seed 4 --label picomatch-4.0.2 --out "$here/javascript.jsonl"
mine "$src/mobx-6.13.5/package/src" --language typescript --n 50 --seed 5 --label mobx-6.13.5 --out "$here/typescript.jsonl"
mine "$src/react-native-webview-13.12.2/package/src" --language tsx --n 50 --seed 6 --label react-native-webview-13.12.2 --out "$here/tsx.jsonl"
mine "$src/react-native-webview-13.12.2/package/android" --language java --n 50 --seed 7 --label react-native-webview-13.12.2 --out "$here/java.jsonl"

# C: ujson's own C sources (the sdist; its vendored C++ double-conversion is left out).
pip download -q --no-deps --no-binary :all: -d "$src/pypi" ujson==5.10.0
rm -rf "$src/ujson-5.10.0"; tar xzf "$src/pypi/ujson-5.10.0.tar.gz" -C "$src"; rm -rf "$src/ujson-5.10.0/deps"
mine "$src/ujson-5.10.0" --language c --n 50 --seed 8 --label ujson-5.10.0 --out "$here/c.jsonl"

# Go, Rust, C++: Debian's source packages.
if [ "$(id -u)" = 0 ]; then
  apt-get install -y -q golang-github-google-go-cmp-dev=0.5.9-1 librust-semver-dev=1.0.14-1 nlohmann-json3-dev=3.11.2-2 >/dev/null
fi
mine /usr/share/gocode/src/github.com/google/go-cmp --language go --n 50 --seed 9 --label go-cmp-0.5.9 --out "$here/go.jsonl"
mine /usr/share/cargo/registry/semver-1.0.14 --language rust --n 50 --seed 10 --label semver-1.0.14 --out "$here/rust.jsonl"
mine /usr/include/nlohmann --language cpp --n 50 --seed 11 --label nlohmann-json-3.11.2 --out "$here/cpp.jsonl"
wc -l "$here"/*.jsonl
