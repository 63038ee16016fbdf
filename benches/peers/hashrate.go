// hashrate — how fast Go's crypto/sha256 hashes on one goroutine.
//
// It exists to explain the Go peers' times: goref and dlserve hash every
// byte with crypto/sha256 on the goroutine that copies, so this rate bounds
// them. A 1 MiB buffer of pseudo-random bytes is hashed again and again with
// one sha256.New() for at least SECONDS (default 2) after a short warm-up;
// the rate is printed as bytes per second on stdout.
//
// Usage:
//
//	hashrate [SECONDS]
//
// Standard library only.
package main

import (
	"crypto/sha256"
	"fmt"
	"math/rand"
	"os"
	"strconv"
	"time"
)

func main() {
	secs := 2.0
	if len(os.Args) > 1 {
		v, err := strconv.ParseFloat(os.Args[1], 64)
		if err != nil || v <= 0 {
			fmt.Fprintln(os.Stderr, "usage: hashrate [SECONDS]")
			os.Exit(2)
		}
		secs = v
	}
	buf := make([]byte, 1<<20)
	rand.New(rand.NewSource(1)).Read(buf)
	h := sha256.New()
	for i := 0; i < 64; i++ {
		h.Write(buf)
	}
	var n int64
	start := time.Now()
	limit := time.Duration(secs * float64(time.Second))
	for time.Since(start) < limit {
		for i := 0; i < 16; i++ {
			h.Write(buf)
		}
		n += 16 << 20
	}
	elapsed := time.Since(start).Seconds()
	_ = h.Sum(nil)
	fmt.Printf("%.0f\n", float64(n)/elapsed)
}
