// rangeload — concurrent HTTP readers for the serve benchmarks: C workers,
// each on its own kept-alive connection, make N GET requests of URL and
// read every body to the end.
//
//	rangeload -c 16 -n 400 -size 262144 -total BYTES URL   # qemu-like ranges
//	rangeload -c 16 -n 1 -whole URL                         # whole-body GETs
//
// Ranges are SIZE bytes at random SIZE-aligned offsets below TOTAL (the
// reads of a VM booting from the URL through qemu's HTTP block driver); each
// answer must be 206 with exactly SIZE bytes. Whole GETs must be 200.
// Prints "BYTES SECONDS" on stdout; any failure exits 1.
//
// Standard library only; builds with Go 1.19.
package main

import (
	"flag"
	"fmt"
	"io"
	"math/rand"
	"net/http"
	"os"
	"sync"
	"time"
)

func main() {
	c := flag.Int("c", 16, "concurrent connections")
	n := flag.Int("n", 100, "requests per connection")
	size := flag.Int64("size", 256<<10, "range size")
	total := flag.Int64("total", 0, "body size (for ranges)")
	whole := flag.Bool("whole", false, "whole-body GETs instead of ranges")
	flag.Parse()
	if flag.NArg() != 1 || (!*whole && *total < *size) {
		flag.Usage()
		os.Exit(2)
	}
	url := flag.Arg(0)
	var (
		mu    sync.Mutex
		bytes int64
		fail  error
		wg    sync.WaitGroup
	)
	start := time.Now()
	for i := 0; i < *c; i++ {
		wg.Add(1)
		go func(seed int64) {
			defer wg.Done()
			client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 1, DisableCompression: true}}
			rng := rand.New(rand.NewSource(seed))
			var got int64
			for j := 0; j < *n; j++ {
				req, _ := http.NewRequest("GET", url, nil)
				want := http.StatusOK
				if !*whole {
					off := rng.Int63n(*total / *size) * *size
					req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", off, off+*size-1))
					want = http.StatusPartialContent
				}
				resp, err := client.Do(req)
				if err == nil {
					var m int64
					m, err = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					got += m
					if err == nil && resp.StatusCode != want {
						err = fmt.Errorf("status %d", resp.StatusCode)
					}
					if err == nil && !*whole && m != *size {
						err = fmt.Errorf("%d bytes for a %d byte range", m, *size)
					}
				}
				if err != nil {
					mu.Lock()
					fail = err
					mu.Unlock()
					return
				}
			}
			mu.Lock()
			bytes += got
			mu.Unlock()
		}(int64(i + 1))
	}
	wg.Wait()
	if fail != nil {
		fmt.Fprintf(os.Stderr, "rangeload: %v\n", fail)
		os.Exit(1)
	}
	fmt.Printf("%d %.6f\n", bytes, time.Since(start).Seconds())
}
