// dlserve — a benchmark peer with the shape of epoch's public /dl/{name}
// route: a Go net/http server that streams a cloud image's disk layers out
// of an OCI image layout into the http.ResponseWriter the way the Go
// reference's StreamParsed does (see ../../../shared/docs/FORMAT.md).
//
// GET /dl/NAME[:TAG] (TAG defaults to "latest"): DIR/NAME is a layout; the
// manifest is the index.json entry whose org.opencontainers.image.ref.name
// is TAG; its disk layers, stable-sorted by title, are each opened and
//
//	io.CopyN(io.MultiWriter(w, h), blob, size)   // h := sha256.New()
//
// with the digest compared after each one. No Content-Length (the response
// is chunked), no Range, no HEAD, and an error after the first byte is only
// logged: the chunked response still ends cleanly — exactly epoch's
// weaknesses. The MultiWriter hides the ResponseWriter's ReadFrom, so every
// byte passes through a 32 KiB user-space buffer, as in epoch.
//
// -noverify copies with io.CopyN(w, blob, size) instead (still chunked, so
// net/http cannot use sendfile either).
//
// Usage:
//
//	dlserve [-noverify] [-addr 127.0.0.1:0] -root DIR
//
// The first line on stdout is the base URL (http://ADDR).
//
// Standard library only; builds with Go 1.19.
package main

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"hash"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

const (
	titleAnnotation   = "org.opencontainers.image.title"
	refNameAnnotation = "org.opencontainers.image.ref.name"
)

type descriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int64             `json:"size"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

type manifest struct {
	Layers    []descriptor `json:"layers"`
	Manifests []descriptor `json:"manifests"`
}

var (
	root     string
	noverify bool
)

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "listen address")
	flag.StringVar(&root, "root", "", "directory of OCI image layouts")
	flag.BoolVar(&noverify, "noverify", false, "do not hash the layers")
	flag.Parse()
	if root == "" {
		flag.Usage()
		os.Exit(2)
	}
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("http://%s\n", ln.Addr())
	http.HandleFunc("/dl/", download)
	log.Fatal(http.Serve(ln, nil))
}

func download(w http.ResponseWriter, r *http.Request) {
	ref := strings.TrimPrefix(r.URL.Path, "/dl/")
	name, tag := ref, "latest"
	if i := strings.LastIndex(ref, ":"); i >= 0 {
		name, tag = ref[:i], ref[i+1:]
	}
	if strings.Contains(name, "..") {
		http.Error(w, "bad name", http.StatusBadRequest)
		return
	}
	dir := filepath.Join(root, name)
	disks, err := diskLayers(dir, tag)
	if err != nil {
		http.Error(w, err.Error(), http.StatusNotFound)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.WriteHeader(http.StatusOK)
	for _, d := range disks {
		if err := copyBlob(dir, d, w); err != nil {
			// As epoch: logged only; the handler returns normally.
			log.Printf("dl %s: layer %s: %v", ref, d.Digest, err)
			return
		}
	}
}

func diskLayers(dir, tag string) ([]descriptor, error) {
	raw, err := os.ReadFile(filepath.Join(dir, "index.json"))
	if err != nil {
		return nil, err
	}
	var idx manifest
	if err := json.Unmarshal(raw, &idx); err != nil {
		return nil, err
	}
	var digest string
	for _, d := range idx.Manifests {
		if d.Annotations[refNameAnnotation] == tag {
			digest = d.Digest
		}
	}
	if digest == "" {
		return nil, fmt.Errorf("tag %q not found", tag)
	}
	raw, err = os.ReadFile(blobPath(dir, digest))
	if err != nil {
		return nil, err
	}
	var m manifest
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, err
	}
	var disks []descriptor
	for _, l := range m.Layers {
		if strings.HasPrefix(l.MediaType, "application/vnd.cocoonstack.") && strings.Contains(l.MediaType, ".disk.") {
			disks = append(disks, l)
		}
	}
	if len(disks) == 0 {
		return nil, errors.New("no disk layers")
	}
	sort.SliceStable(disks, func(i, j int) bool {
		return disks[i].Annotations[titleAnnotation] < disks[j].Annotations[titleAnnotation]
	})
	return disks, nil
}

func blobPath(dir, digest string) string {
	return filepath.Join(dir, "blobs", "sha256", strings.TrimPrefix(digest, "sha256:"))
}

func copyBlob(dir string, d descriptor, w io.Writer) error {
	f, err := os.Open(blobPath(dir, d.Digest))
	if err != nil {
		return err
	}
	defer f.Close()
	var h hash.Hash
	dst := w
	if !noverify {
		h = sha256.New()
		dst = io.MultiWriter(w, h)
	} else {
		dst = struct{ io.Writer }{w} // no ReadFrom, as through StreamParsed
	}
	if _, err := io.CopyN(dst, f, d.Size); err != nil {
		return err
	}
	if h != nil {
		if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != d.Digest {
			return fmt.Errorf("digest mismatch: got %s", got)
		}
	}
	return nil
}
