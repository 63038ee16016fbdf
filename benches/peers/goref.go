// goref — a benchmark peer with the shape of the Go reference: the epoch
// registry's Go package `cloudimg` (Stream + CopyBlobExact).
//
// It exists so that cloudimg's throughput can be measured against what the Go
// reference does on the same machine and the same image, without needing the
// epoch code base: parse the manifest, take the disk layers, stable-sort them
// by their title annotation, and for each layer open the blob and
//
//	io.CopyN(io.MultiWriter(os.Stdout, h), blob, size)   // h := sha256.New()
//
// then compare hex(h.Sum(nil)) with the layer digest. One blob at a time, one
// stream per blob, no read-ahead. The MultiWriter is deliberate: it hides
// os.Stdout's ReadFrom, so every byte goes through a 32 KiB user-space buffer,
// exactly as in the reference.
//
// Usage:
//
//	goref [-noverify] layout DIR TAG
//	goref [-noverify] http BASEURL REPO TAG
//
// layout: DIR is an OCI image layout; the manifest is the index.json entry
// whose org.opencontainers.image.ref.name is TAG; blobs are read from
// DIR/blobs/sha256/HEX with os.Open.
//
// http: a registry over net/http with the default client: GET
// BASEURL/v2/REPO/manifests/TAG (Accept: the OCI manifest type), then
// GET BASEURL/v2/REPO/blobs/DIGEST for each disk layer, sequentially.
//
// -noverify skips hashing: io.CopyN(os.Stdout, blob, size).
//
// The assembled disk goes to stdout. A short blob, an HTTP error or a digest
// mismatch ends the run with a message on stderr and exit status 1.
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
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

const (
	titleAnnotation   = "org.opencontainers.image.title"
	refNameAnnotation = "org.opencontainers.image.ref.name"
	ociManifestType   = "application/vnd.oci.image.manifest.v1+json"
)

var diskMediaTypes = map[string]bool{
	"application/vnd.cocoonstack.disk.qcow2":              true,
	"application/vnd.cocoonstack.disk.qcow2.part":         true,
	"application/vnd.cocoonstack.disk.raw":                true,
	"application/vnd.cocoonstack.disk.raw.part":           true,
	"application/vnd.cocoonstack.windows.disk.qcow2":      true,
	"application/vnd.cocoonstack.windows.disk.qcow2.part": true,
	"application/vnd.cocoonstack.windows.disk.raw":        true,
	"application/vnd.cocoonstack.windows.disk.raw.part":   true,
}

type descriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int64             `json:"size"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

type manifest struct {
	MediaType    string       `json:"mediaType"`
	ArtifactType string       `json:"artifactType"`
	Layers       []descriptor `json:"layers"`
}

type index struct {
	Manifests []descriptor `json:"manifests"`
}

// blobSource opens a blob by its digest ("sha256:HEX").
type blobSource interface {
	open(digest string) (io.ReadCloser, error)
}

func main() {
	noverify := flag.Bool("noverify", false, "do not hash the layers (io.CopyN(os.Stdout, blob, size))")
	flag.Usage = func() {
		fmt.Fprintf(os.Stderr, "usage:\n  goref [-noverify] layout DIR TAG\n  goref [-noverify] http BASEURL REPO TAG\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	args := flag.Args()

	var (
		raw   []byte
		blobs blobSource
		err   error
	)
	switch {
	case len(args) == 3 && args[0] == "layout":
		l := &layout{dir: args[1]}
		raw, err = l.manifest(args[2])
		blobs = l
	case len(args) == 4 && args[0] == "http":
		r := &registry{base: strings.TrimRight(args[1], "/"), repo: args[2]}
		raw, err = r.manifest(args[3])
		blobs = r
	default:
		flag.Usage()
		os.Exit(2)
	}
	if err == nil {
		err = stream(raw, blobs, os.Stdout, !*noverify)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "goref: %v\n", err)
		os.Exit(1)
	}
}

// stream writes the disk layers of the manifest raw to w, in title order.
func stream(raw []byte, blobs blobSource, w io.Writer, verify bool) error {
	var m manifest
	if err := json.Unmarshal(raw, &m); err != nil {
		return fmt.Errorf("manifest: %v", err)
	}
	var disks []descriptor
	for _, l := range m.Layers {
		if diskMediaTypes[l.MediaType] {
			disks = append(disks, l)
		}
	}
	if len(disks) == 0 {
		return errors.New("manifest has no disk layers")
	}
	sort.SliceStable(disks, func(i, j int) bool {
		return disks[i].Annotations[titleAnnotation] < disks[j].Annotations[titleAnnotation]
	})
	for _, d := range disks {
		if err := copyBlob(blobs, d, w, verify); err != nil {
			return fmt.Errorf("layer %q (%s): %v", d.Annotations[titleAnnotation], d.Digest, err)
		}
	}
	return nil
}

// copyBlob is the reference's CopyBlobExact: exactly d.Size bytes of the blob
// to w, hashed on the way through a MultiWriter, then the digest compared.
func copyBlob(blobs blobSource, d descriptor, w io.Writer, verify bool) error {
	want, err := sha256Hex(d.Digest)
	if err != nil {
		return err
	}
	blob, err := blobs.open(d.Digest)
	if err != nil {
		return err
	}
	defer blob.Close()

	var h hash.Hash
	dst := w
	if verify {
		h = sha256.New()
		dst = io.MultiWriter(w, h)
	}
	n, err := io.CopyN(dst, blob, d.Size)
	if err != nil {
		if err == io.EOF {
			return fmt.Errorf("short blob: %d of %d bytes", n, d.Size)
		}
		return err
	}
	if verify {
		if got := hex.EncodeToString(h.Sum(nil)); got != want {
			return fmt.Errorf("digest mismatch: got sha256:%s", got)
		}
	}
	return nil
}

// sha256Hex returns the hex of a "sha256:HEX" digest, refusing anything else
// (the hex also becomes a path component in a layout).
func sha256Hex(digest string) (string, error) {
	hexPart := strings.TrimPrefix(digest, "sha256:")
	if hexPart == digest || len(hexPart) != 64 {
		return "", fmt.Errorf("unsupported digest %q", digest)
	}
	for _, c := range hexPart {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return "", fmt.Errorf("invalid digest %q", digest)
		}
	}
	return hexPart, nil
}

// layout is an OCI image layout directory.
type layout struct{ dir string }

func (l *layout) blobPath(digest string) (string, error) {
	hexPart, err := sha256Hex(digest)
	if err != nil {
		return "", err
	}
	return filepath.Join(l.dir, "blobs", "sha256", hexPart), nil
}

func (l *layout) manifest(tag string) ([]byte, error) {
	raw, err := os.ReadFile(filepath.Join(l.dir, "index.json"))
	if err != nil {
		return nil, err
	}
	var idx index
	if err := json.Unmarshal(raw, &idx); err != nil {
		return nil, fmt.Errorf("index.json: %v", err)
	}
	for _, m := range idx.Manifests {
		if m.Annotations[refNameAnnotation] == tag {
			p, err := l.blobPath(m.Digest)
			if err != nil {
				return nil, err
			}
			return os.ReadFile(p)
		}
	}
	return nil, fmt.Errorf("%s: no manifest tagged %q", l.dir, tag)
}

func (l *layout) open(digest string) (io.ReadCloser, error) {
	p, err := l.blobPath(digest)
	if err != nil {
		return nil, err
	}
	return os.Open(p)
}

// registry is an OCI distribution API endpoint, spoken with the default
// http.Client (no auth, redirects followed).
type registry struct{ base, repo string }

func (r *registry) get(url, accept string) (*http.Response, error) {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	if accept != "" {
		req.Header.Set("Accept", accept)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return resp, nil
}

func (r *registry) manifest(tag string) ([]byte, error) {
	// docker-registry 2.8 answers 404 unless the OCI type is accepted exactly.
	resp, err := r.get(r.base+"/v2/"+r.repo+"/manifests/"+tag, ociManifestType)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	return io.ReadAll(io.LimitReader(resp.Body, 4<<20))
}

func (r *registry) open(digest string) (io.ReadCloser, error) {
	if _, err := sha256Hex(digest); err != nil {
		return nil, err
	}
	resp, err := r.get(r.base+"/v2/"+r.repo+"/blobs/"+digest, "")
	if err != nil {
		return nil, err
	}
	return resp.Body, nil
}
