// ratecap — a test HTTP server standing in for rate-capped object storage.
//
// It exists because the registry backends cloud images really come from (S3,
// a CDN behind a 307) cap the throughput of each connection, so that one
// stream per blob is slow and several parallel range requests are fast. A
// loopback registry has no such cap; ratecap adds one, per connection, so the
// benchmarks can compare sequential and parallel fetchers under it.
//
// Usage:
//
//	ratecap [-addr 127.0.0.1:0] [-rate 50e6] -dir DIR
//
// DIR is an OCI image layout root (with index.json and blobs/sha256/) or a
// layout's blobs/sha256/ directory itself. Served:
//
//	GET /v2/                          200 {}
//	GET /v2/REPO/blobs/sha256:HEX     DIR/blobs/sha256/HEX (or DIR/HEX)
//	GET /v2/REPO/manifests/TAG        the manifest whose index.json entry has
//	                                  org.opencontainers.image.ref.name TAG
//	GET /v2/REPO/manifests/sha256:HEX the manifest blob by digest
//
// REPO is any name and is ignored. HEAD works too, and Range (bytes=N- and
// bytes=N-M) answers 206 with Content-Range, through http.ServeContent. Blobs
// and manifests carry Docker-Content-Digest.
//
// Every connection's send rate is capped at -rate bytes/s (default 50e6) by a
// token bucket that the response body passes through in slices of at most
// 64 KiB; the bucket belongs to the connection, so keep-alive requests share
// it and parallel connections each get the full rate. -rate 0 disables the
// cap. The listening address (useful with port 0) is printed as the first
// line of stdout. SIGINT or SIGTERM stops the server.
//
// Standard library only; builds with Go 1.19.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

const (
	sliceSize         = 64 << 10
	refNameAnnotation = "org.opencontainers.image.ref.name"
	ociManifestType   = "application/vnd.oci.image.manifest.v1+json"
)

// bucket is a token bucket: take(n) sleeps until n bytes may be sent.
// Tokens are allowed to go negative (a debt paid by sleeping), so oversleeping
// is credited back on the next call, up to the burst.
type bucket struct {
	mu     sync.Mutex
	rate   float64 // bytes per second
	burst  float64 // bytes
	tokens float64
	last   time.Time
}

func newBucket(rate float64) *bucket {
	burst := rate / 100 // 10 ms worth of data
	if burst < 2*sliceSize {
		burst = 2 * sliceSize
	}
	return &bucket{rate: rate, burst: burst, tokens: burst, last: time.Now()}
}

func (b *bucket) take(n int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	now := time.Now()
	b.tokens += now.Sub(b.last).Seconds() * b.rate
	if b.tokens > b.burst {
		b.tokens = b.burst
	}
	b.last = now
	b.tokens -= float64(n)
	if b.tokens < 0 {
		time.Sleep(time.Duration(-b.tokens / b.rate * float64(time.Second)))
	}
}

// cappedWriter passes a response body through its connection's bucket.
// It deliberately does not implement io.ReaderFrom, so the body is written in
// user space (no sendfile) and every byte is paced.
type cappedWriter struct {
	http.ResponseWriter
	b *bucket
}

func (w cappedWriter) Write(p []byte) (int, error) {
	written := 0
	for len(p) > 0 {
		n := len(p)
		if n > sliceSize {
			n = sliceSize
		}
		w.b.take(n)
		m, err := w.ResponseWriter.Write(p[:n])
		written += m
		if err != nil {
			return written, err
		}
		p = p[n:]
	}
	return written, nil
}

type ctxKey struct{}

type server struct {
	blobDir string // the directory holding the HEX files
	root    string // the layout root, "" when DIR is a blobs/sha256/ directory
	rate    float64
}

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "listen address (port 0: any free port)")
	rate := flag.Float64("rate", 50e6, "per-connection send cap in bytes/s (0: no cap)")
	dir := flag.String("dir", "", "OCI layout root, or its blobs/sha256/ directory")
	flag.Parse()
	if *dir == "" || flag.NArg() != 0 {
		fmt.Fprintln(os.Stderr, "usage: ratecap [-addr HOST:PORT] [-rate BYTES_PER_SEC] -dir DIR")
		os.Exit(2)
	}

	s := &server{blobDir: *dir, rate: *rate}
	if _, err := os.Stat(filepath.Join(*dir, "index.json")); err == nil {
		s.root = *dir
		s.blobDir = filepath.Join(*dir, "blobs", "sha256")
	}
	if fi, err := os.Stat(s.blobDir); err != nil || !fi.IsDir() {
		fmt.Fprintf(os.Stderr, "ratecap: %s is neither a layout nor a blobs/sha256 directory\n", *dir)
		os.Exit(1)
	}

	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "ratecap: %v\n", err)
		os.Exit(1)
	}
	fmt.Println(ln.Addr().String())

	srv := &http.Server{
		Handler: s,
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			if s.rate <= 0 {
				return ctx
			}
			return context.WithValue(ctx, ctxKey{}, newBucket(s.rate))
		},
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-sig
		srv.Close()
	}()
	if err := srv.Serve(ln); err != nil && err != http.ErrServerClosed {
		fmt.Fprintf(os.Stderr, "ratecap: %v\n", err)
		os.Exit(1)
	}
}

func (s *server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		s.fail(w, http.StatusMethodNotAllowed, "UNSUPPORTED", "method not allowed")
		return
	}
	if b, ok := r.Context().Value(ctxKey{}).(*bucket); ok {
		w = cappedWriter{ResponseWriter: w, b: b}
	}
	path := r.URL.Path
	if path == "/v2/" || path == "/v2" {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Docker-Distribution-Api-Version", "registry/2.0")
		fmt.Fprint(w, "{}")
		return
	}
	if !strings.HasPrefix(path, "/v2/") {
		s.fail(w, http.StatusNotFound, "NAME_UNKNOWN", "not found")
		return
	}
	if i := strings.LastIndex(path, "/blobs/"); i > len("/v2") {
		s.serveBlob(w, r, path[i+len("/blobs/"):], "application/octet-stream")
		return
	}
	if i := strings.LastIndex(path, "/manifests/"); i > len("/v2") {
		s.serveManifest(w, r, path[i+len("/manifests/"):])
		return
	}
	s.fail(w, http.StatusNotFound, "NAME_UNKNOWN", "not found")
}

// serveBlob serves the blob DIGEST with Range support.
func (s *server) serveBlob(w http.ResponseWriter, r *http.Request, digest, contentType string) {
	hexPart, ok := sha256Hex(digest)
	if !ok {
		s.fail(w, http.StatusBadRequest, "DIGEST_INVALID", "invalid digest")
		return
	}
	f, err := os.Open(filepath.Join(s.blobDir, hexPart))
	if err != nil {
		s.fail(w, http.StatusNotFound, "BLOB_UNKNOWN", "blob unknown")
		return
	}
	defer f.Close()
	w.Header().Set("Content-Type", contentType)
	w.Header().Set("Docker-Content-Digest", digest)
	w.Header().Set("Accept-Ranges", "bytes")
	http.ServeContent(w, r, "", time.Time{}, f)
}

// serveManifest resolves REF (a tag, through index.json, or a digest) and
// serves that manifest blob.
func (s *server) serveManifest(w http.ResponseWriter, r *http.Request, ref string) {
	mediaType := ociManifestType
	digest := ref
	if !strings.HasPrefix(ref, "sha256:") {
		if s.root == "" {
			s.fail(w, http.StatusNotFound, "MANIFEST_UNKNOWN", "tags need a layout root (-dir)")
			return
		}
		d, mt, err := s.resolveTag(ref)
		if err != nil {
			s.fail(w, http.StatusNotFound, "MANIFEST_UNKNOWN", err.Error())
			return
		}
		digest = d
		if mt != "" {
			mediaType = mt
		}
	}
	s.serveBlob(w, r, digest, mediaType)
}

func (s *server) resolveTag(tag string) (digest, mediaType string, err error) {
	raw, err := os.ReadFile(filepath.Join(s.root, "index.json"))
	if err != nil {
		return "", "", err
	}
	var idx struct {
		Manifests []struct {
			MediaType   string            `json:"mediaType"`
			Digest      string            `json:"digest"`
			Annotations map[string]string `json:"annotations"`
		} `json:"manifests"`
	}
	if err := json.Unmarshal(raw, &idx); err != nil {
		return "", "", fmt.Errorf("index.json: %v", err)
	}
	for _, m := range idx.Manifests {
		if m.Annotations[refNameAnnotation] == tag {
			return m.Digest, m.MediaType, nil
		}
	}
	return "", "", fmt.Errorf("no manifest tagged %q", tag)
}

func (s *server) fail(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	body, _ := json.Marshal(map[string]interface{}{
		"errors": []map[string]string{{"code": code, "message": msg}},
	})
	w.Write(body)
}

func sha256Hex(digest string) (string, bool) {
	hexPart := strings.TrimPrefix(digest, "sha256:")
	if hexPart == digest || len(hexPart) != 64 {
		return "", false
	}
	for _, c := range hexPart {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return "", false
		}
	}
	return hexPart, true
}
