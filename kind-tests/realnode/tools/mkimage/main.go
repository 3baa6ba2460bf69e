// mkimage writes a single-layer OCI image archive (the tar form of an OCI
// image layout) that `ctr images import` accepts, from a plain list of
// entries, so that the realnode prototype needs no registry and no image
// tool. The output is deterministic (fixed mtimes, uid/gid 0).
//
//	mkimage -ref localhost/busybox:1.35.0 -out busybox.tar \
//	        -entrypoint /bin/sh -cmd '' -user '' [-fast] < entries
//
// It prints the image manifest's digest (sha256:...) on stdout: a pod that
// names the image by that digest runs exactly this archive once imported.
// -fast compresses the layer at gzip's fastest level (large binaries).
//
// entries, one per line:
//
//	dir DST MODE           (octal)
//	file SRC DST MODE      (copies the host file SRC)
//	symlink TARGET DST
package main

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path"
	"strconv"
	"strings"
	"time"
)

type descriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int64             `json:"size"`
	Annotations map[string]string `json:"annotations,omitempty"`
	Platform    map[string]string `json:"platform,omitempty"`
}

var epoch = time.Unix(0, 0).UTC()

func main() {
	ref := flag.String("ref", "", "image reference, e.g. localhost/pause:3.10")
	out := flag.String("out", "", "output archive")
	entrypoint := flag.String("entrypoint", "", "entrypoint, words separated by spaces")
	cmd := flag.String("cmd", "", "cmd, words separated by spaces")
	user := flag.String("user", "", "image user (uid:gid)")
	fast := flag.Bool("fast", false, "compress the layer at gzip's fastest level")
	flag.Parse()
	if *ref == "" || *out == "" {
		fmt.Fprintln(os.Stderr, "usage: mkimage -ref REF -out FILE [-entrypoint ..] [-cmd ..] [-user ..] < entries")
		os.Exit(2)
	}
	level := gzip.BestCompression
	if *fast {
		level = gzip.BestSpeed
	}
	manifestDigest, err := run(*ref, *out, words(*entrypoint), words(*cmd), *user, level)
	if err != nil {
		fmt.Fprintf(os.Stderr, "mkimage: %v\n", err)
		os.Exit(1)
	}
	fmt.Println(manifestDigest)
}

func words(s string) []string {
	if strings.TrimSpace(s) == "" {
		return nil
	}
	return strings.Fields(s)
}

type layerWriter struct {
	tw   *tar.Writer
	seen map[string]bool
}

func (l *layerWriter) parents(p string) error {
	dir := path.Dir(p)
	if dir == "/" || dir == "." || l.seen[dir] {
		return nil
	}
	if err := l.parents(dir); err != nil {
		return err
	}
	return l.dir(dir, 0o755)
}

func (l *layerWriter) dir(p string, mode int64) error {
	if l.seen[p] {
		return nil
	}
	if err := l.parents(p); err != nil {
		return err
	}
	l.seen[p] = true
	return l.tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: strings.TrimPrefix(p, "/") + "/", Mode: mode, ModTime: epoch, Format: tar.FormatPAX})
}

func (l *layerWriter) file(src, p string, mode int64) error {
	data, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	if err := l.parents(p); err != nil {
		return err
	}
	l.seen[p] = true
	if err := l.tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: strings.TrimPrefix(p, "/"), Mode: mode, Size: int64(len(data)), ModTime: epoch, Format: tar.FormatPAX}); err != nil {
		return err
	}
	_, err = l.tw.Write(data)
	return err
}

func (l *layerWriter) symlink(target, p string) error {
	if err := l.parents(p); err != nil {
		return err
	}
	l.seen[p] = true
	return l.tw.WriteHeader(&tar.Header{Typeflag: tar.TypeSymlink, Name: strings.TrimPrefix(p, "/"), Linkname: target, Mode: 0o777, ModTime: epoch, Format: tar.FormatPAX})
}

func buildLayer() (raw []byte, err error) {
	var buf bytes.Buffer
	l := &layerWriter{tw: tar.NewWriter(&buf), seen: map[string]bool{}}
	sc := bufio.NewScanner(os.Stdin)
	for n := 1; sc.Scan(); n++ {
		f := strings.Fields(sc.Text())
		if len(f) == 0 || strings.HasPrefix(f[0], "#") {
			continue
		}
		bad := fmt.Errorf("line %d: bad entry %q", n, sc.Text())
		switch {
		case f[0] == "dir" && len(f) == 3:
			m, perr := strconv.ParseInt(f[2], 8, 32)
			if perr != nil {
				return nil, bad
			}
			err = l.dir(path.Clean(f[1]), m)
		case f[0] == "file" && len(f) == 4:
			m, perr := strconv.ParseInt(f[3], 8, 32)
			if perr != nil {
				return nil, bad
			}
			err = l.file(f[1], path.Clean(f[2]), m)
		case f[0] == "symlink" && len(f) == 3:
			err = l.symlink(f[1], path.Clean(f[2]))
		default:
			return nil, bad
		}
		if err != nil {
			return nil, fmt.Errorf("line %d: %w", n, err)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if err := l.tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func digest(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}

func run(ref, out string, entrypoint, cmd []string, user string, level int) (string, error) {
	raw, err := buildLayer()
	if err != nil {
		return "", err
	}
	var gz bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&gz, level)
	if _, err := zw.Write(raw); err != nil {
		return "", err
	}
	if err := zw.Close(); err != nil {
		return "", err
	}
	layer := gz.Bytes()

	imgCfg := map[string]any{
		"Env":        []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
		"WorkingDir": "/",
	}
	if entrypoint != nil {
		imgCfg["Entrypoint"] = entrypoint
	}
	if cmd != nil {
		imgCfg["Cmd"] = cmd
	}
	if user != "" {
		imgCfg["User"] = user
	}
	config, err := json.Marshal(map[string]any{
		"created":      epoch.Format(time.RFC3339),
		"architecture": "amd64",
		"os":           "linux",
		"config":       imgCfg,
		"rootfs":       map[string]any{"type": "layers", "diff_ids": []string{digest(raw)}},
		"history":      []map[string]any{{"created": epoch.Format(time.RFC3339), "created_by": "contextos realnode mkimage"}},
	})
	if err != nil {
		return "", err
	}
	manifest, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.manifest.v1+json",
		"config":        descriptor{MediaType: "application/vnd.oci.image.config.v1+json", Digest: digest(config), Size: int64(len(config))},
		"layers":        []descriptor{{MediaType: "application/vnd.oci.image.layer.v1.tar+gzip", Digest: digest(layer), Size: int64(len(layer))}},
	})
	if err != nil {
		return "", err
	}
	tag := ref[strings.LastIndex(ref, ":")+1:]
	index, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.index.v1+json",
		"manifests": []descriptor{{
			MediaType:   "application/vnd.oci.image.manifest.v1+json",
			Digest:      digest(manifest),
			Size:        int64(len(manifest)),
			Annotations: map[string]string{"io.containerd.image.name": ref, "org.opencontainers.image.ref.name": tag},
			Platform:    map[string]string{"architecture": "amd64", "os": "linux"},
		}},
	})
	if err != nil {
		return "", err
	}

	f, err := os.Create(out + ".tmp")
	if err != nil {
		return "", err
	}
	defer os.Remove(out + ".tmp")
	tw := tar.NewWriter(f)
	add := func(name string, b []byte) error {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: int64(len(b)), ModTime: epoch}); err != nil {
			return err
		}
		_, err := tw.Write(b)
		return err
	}
	blob := func(b []byte) string { return "blobs/sha256/" + strings.TrimPrefix(digest(b), "sha256:") }
	for _, d := range []string{"blobs/", "blobs/sha256/"} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d, Mode: 0o755, ModTime: epoch}); err != nil {
			return "", err
		}
	}
	for _, e := range []struct {
		name string
		b    []byte
	}{
		{"oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)},
		{blob(layer), layer},
		{blob(config), config},
		{blob(manifest), manifest},
		{"index.json", index},
	} {
		if err := add(e.name, e.b); err != nil {
			return "", err
		}
	}
	if err := tw.Close(); err != nil {
		return "", err
	}
	if err := f.Close(); err != nil {
		return "", err
	}
	if err := os.Rename(out+".tmp", out); err != nil {
		return "", err
	}
	return digest(manifest), nil
}
