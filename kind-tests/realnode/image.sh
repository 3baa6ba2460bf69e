#!/usr/bin/env bash
# image.sh packs the workspace's binaries into the ContextOS image for the real node, without a
# registry or an image tool: the binaries (debug info stripped), the shared libraries they load
# (found with ldd), a passwd entry for the non-root user 65532, an empty /tmp; entrypoint
# `contextos`, user 65532. The same image is described for users in the repository's
# Containerfile (a distroless base instead of the host's libraries).
#
#   bash kind-tests/realnode/image.sh REF BINARY...
#     -> last two stdout lines: the archive to import (`ctr -n k8s.io images import`),
#        then REF@sha256:<manifest digest> (what pods name)
#
# Cached by the binaries' content under the realnode cache directory (build.sh's), so an
# unchanged build costs one sha256 of the binaries.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
log() { echo "image.sh: $*" >&2; }
[[ $# -ge 2 ]] || {
	log "usage: image.sh REF BINARY..."
	exit 2
}
ref="$1"
shift
B="$(bash "$here/build.sh" | tail -n1)"
for bin in "$@"; do
	[[ -x "$bin" ]] || {
		log "$bin is not an executable file"
		exit 1
	}
done
key="$({
	echo "$ref"
	cat "$here/image.sh"
	sha256sum "$@" | cut -d' ' -f1
} | sha256sum | cut -c1-16)"
cache="$(dirname "$B")/images"
tar="$cache/contextos-$key.tar"
mkdir -p "$cache"
if [[ ! -s "$tar" || ! -s "$tar.digest" ]]; then
	t0=$SECONDS
	work="$(mktemp -d)"
	trap 'rm -rf "$work"' EXIT
	declare -A libs=()
	{
		echo "dir /usr/local/bin 0755"
		for bin in "$@"; do
			name="$(basename "$bin")"
			# Debug info is most of a debug build's size and nothing at run time needs it.
			objcopy --strip-debug "$bin" "$work/$name"
			echo "file $work/$name /usr/local/bin/$name 0755"
			while read -r lib; do
				libs["$lib"]=1
			done < <(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
		done
		for lib in "${!libs[@]}"; do
			# Keep the path the binaries were linked against (the loader's among them).
			echo "file $(readlink -f "$lib") $lib 0755"
		done
		printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$work/passwd"
		printf 'root:x:0:\nnonroot:x:65532:\n' >"$work/group"
		echo "file $work/passwd /etc/passwd 0644"
		echo "file $work/group /etc/group 0644"
		echo "dir /tmp 1777"
		echo "dir /home/nonroot 0755"
		echo "dir /proc 0555"
		echo "dir /sys 0555"
		echo "dir /dev 0755"
	} >"$work/entries"
	"$B/bin/mkimage" -ref "$ref" -out "$tar.tmp" -fast -entrypoint /usr/local/bin/contextos -user 65532:65532 \
		<"$work/entries" >"$tar.digest.tmp"
	mv -f "$tar.tmp" "$tar"
	mv -f "$tar.digest.tmp" "$tar.digest"
	log "made $ref ($(du -h "$tar" | cut -f1)) in $((SECONDS - t0)) s"
	# Images of older builds are dropped after a day.
	find "$cache" -maxdepth 1 -name 'contextos-*.tar*' -mtime +1 ! -name "contextos-$key.tar*" -delete 2>/dev/null || true
fi
echo "$tar"
echo "$ref@$(cat "$tar.digest")"
