package image_test

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"

	"matchlock.dev/matchlock/image"
	"matchlock.dev/matchlock/image/imagetest"
	"matchlock.dev/matchlock/image/testregistry"
)

func TestMain(m *testing.M) {
	// Re-executed as a second matchlock process by TestPullConcurrentProcesses.
	if ref := os.Getenv("IMAGE_TEST_PULL"); ref != "" {
		s, err := image.Open(os.Getenv("IMAGE_TEST_ROOT"))
		if err == nil {
			_, err = s.Pull(bg, ref, image.PullOptions{})
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func TestPullByTagAndDigest(t *testing.T) {
	reg := testregistry.Start(t)
	bb := imagetest.Busybox(t, hostPlatform)
	ref := reg.Host + "/tools/busybox:1.36"
	push(t, ref, bb)

	s := openStore(t)
	var mu sync.Mutex
	var updates []image.ProgressUpdate
	img, err := s.Pull(bg, ref, image.PullOptions{Progress: func(u image.ProgressUpdate) {
		mu.Lock()
		updates = append(updates, u)
		mu.Unlock()
	}})
	if err != nil {
		t.Fatal(err)
	}
	checkBusybox(t, img)
	if img.Digest != digestOf(t, bb) || img.Repo != reg.Host+"/tools/busybox" || img.Tag != "1.36" {
		t.Errorf("pulled %s %s:%s", img.Digest, img.Repo, img.Tag)
	}
	last := updates[len(updates)-1]
	if !last.Done || last.Cached || last.Complete != img.Layers[0].Size || last.Total != img.Layers[0].Size || last.Count != 1 {
		t.Errorf("last progress update %+v", last)
	}
	if len(updates) < 2 {
		t.Errorf("only %d progress updates", len(updates))
	}
	if _, err := s.Rootfs(bg, img); err != nil {
		t.Fatal(err)
	}

	// By digest: nothing to fetch, a digest name added.
	updates = nil
	byDigest := reg.Host + "/tools/busybox@" + img.Digest
	img2, err := s.Pull(bg, byDigest, image.PullOptions{Progress: func(u image.ProgressUpdate) { updates = append(updates, u) }})
	if err != nil {
		t.Fatal(err)
	}
	if img2.Digest != img.Digest || len(updates) != 1 || !updates[0].Cached {
		t.Errorf("by digest: %s, updates %+v", img2.Digest, updates)
	}
	if _, err := s.Resolve(byDigest); err != nil {
		t.Error(err)
	}
	// Into a fresh store, by digest alone.
	if _, err := openStore(t).Pull(bg, byDigest, image.PullOptions{}); err != nil {
		t.Error(err)
	}
	// A stored digest needs no registry.
	offline := testregistry.ClosedAddr(t) + "/tools/busybox@" + img.Digest
	if _, err := s.Pull(bg, offline, image.PullOptions{}); err != nil {
		t.Errorf("pull of a stored digest from a dead registry: %v", err)
	}
	// Unknown tag, unknown repository.
	for _, r := range []string{reg.Host + "/tools/busybox:nope", reg.Host + "/nobody/here:1"} {
		if _, err := s.Pull(bg, r, image.PullOptions{}); !errors.Is(err, image.ErrNotFound) {
			t.Errorf("pull %s: %v, want ErrNotFound", r, err)
		}
	}
}

func TestPullMultiArch(t *testing.T) {
	reg := testregistry.Start(t)
	amd, arm := imagetest.Busybox(t, "linux/amd64"), imagetest.Busybox(t, "linux/arm64")
	idx := mutate.AppendManifests(empty.Index,
		mutate.IndexAddendum{Add: amd, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "amd64"}}},
		mutate.IndexAddendum{Add: arm, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "arm64", Variant: "v8"}}})
	ref := reg.Host + "/multi:latest"
	pushIndex(t, ref, idx)
	idxDigest, _ := idx.Digest()

	s := openStore(t)
	img, err := s.Pull(bg, ref, image.PullOptions{})
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"linux/amd64": digestOf(t, amd), "linux/arm64": digestOf(t, arm)}[hostPlatform]
	if img.Digest != want || img.Platform != hostPlatform || img.IndexDigest != idxDigest.String() {
		t.Errorf("default platform: %s %s (index %s)", img.Platform, img.Digest, img.IndexDigest)
	}
	img, err = openStore(t).Pull(bg, ref, image.PullOptions{Platform: "linux/arm64"})
	if err != nil {
		t.Fatal(err)
	}
	if img.Digest != digestOf(t, arm) || img.Platform != "linux/arm64" {
		t.Errorf("linux/arm64: %s %s", img.Platform, img.Digest)
	}
	if _, err := s.Pull(bg, ref, image.PullOptions{Platform: "linux/s390x"}); !errors.Is(err, image.ErrNotFound) {
		t.Errorf("missing platform: %v, want ErrNotFound", err)
	}
	// The index digest resolves to the image picked from it.
	if got, err := s.Resolve(idxDigest.String()); err != nil || got.Digest != want {
		t.Errorf("Resolve(index digest): %v %v", got, err)
	}
}

// Two pulls of one image at once, in one process and in two, both succeed
// and store each blob once.
func TestPullConcurrent(t *testing.T) {
	reg := testregistry.Start(t)
	img, err := random.Image(8<<20, 3)
	if err != nil {
		t.Fatal(err)
	}
	ref := reg.Host + "/concurrent:1"
	push(t, ref, img)

	t.Run("goroutines", func(t *testing.T) {
		s := openStore(t)
		var wg sync.WaitGroup
		errs := make([]error, 2)
		for i := range errs {
			wg.Add(1)
			go func() { defer wg.Done(); _, errs[i] = s.Pull(bg, ref, image.PullOptions{}) }()
		}
		wg.Wait()
		for _, err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
		checkOnce(t, s, img)
	})
	t.Run("processes", func(t *testing.T) {
		s := openStore(t)
		var wg sync.WaitGroup
		outs := make([][]byte, 2)
		errs := make([]error, 2)
		for i := range errs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				cmd := exec.Command(os.Args[0], "-test.run=^$")
				cmd.Env = append(os.Environ(), "IMAGE_TEST_PULL="+ref, "IMAGE_TEST_ROOT="+s.Root())
				outs[i], errs[i] = cmd.CombinedOutput()
			}()
		}
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Fatalf("process %d: %v\n%s", i, err, outs[i])
			}
		}
		checkOnce(t, s, img)
	})
}

func checkOnce(t *testing.T, s *image.Store, img v1.Image) {
	t.Helper()
	got, err := s.Resolve(digestOf(t, img))
	if err != nil {
		t.Fatal(err)
	}
	blobs := blobFiles(t, s)
	// manifest + config + layers, each once, and nothing else.
	if len(blobs) != 2+len(got.Layers) {
		t.Errorf("%d blobs stored, want %d", len(blobs), 2+len(got.Layers))
	}
	for _, l := range got.Layers {
		if !blobs[l.Digest] {
			t.Errorf("layer %s missing", l.Digest)
		}
	}
	if left := scratchFiles(t, s); len(left) != 0 {
		t.Errorf("scratch files left: %v", left)
	}
	if list, _ := s.List(); len(list) != 1 {
		t.Errorf("%d images listed, want 1", len(list))
	}
}

// A blob corrupted in the registry's storage is refused, and nothing of it
// stays in the store.
func TestPullCorruptBlob(t *testing.T) {
	reg := testregistry.Start(t)
	img, err := random.Image(1<<20, 2)
	if err != nil {
		t.Fatal(err)
	}
	ref := reg.Host + "/corrupt:1"
	push(t, ref, img)
	layers, _ := img.Layers()
	bad, _ := layers[1].Digest()
	p := reg.BlobPath(bad.String())
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatalf("registry storage: %v", err)
	}
	b[len(b)/2] ^= 0xff // same size, other bytes
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}

	s := openStore(t)
	_, err = s.Pull(bg, ref, image.PullOptions{})
	if !errors.Is(err, image.ErrDigestMismatch) {
		t.Fatalf("got %v, want ErrDigestMismatch", err)
	}
	if blobFiles(t, s)[bad.String()] {
		t.Error("the corrupt blob was stored")
	}
	if left := scratchFiles(t, s); len(left) != 0 {
		t.Errorf("scratch files left: %v", left)
	}
	if list, _ := s.List(); len(list) != 0 {
		t.Errorf("an image was recorded: %v", list)
	}
}

func TestPullUnreachable(t *testing.T) {
	s := openStore(t)
	start := time.Now()
	_, err := s.Pull(bg, testregistry.ClosedAddr(t)+"/x:1", image.PullOptions{})
	if !errors.Is(err, image.ErrUnreachable) {
		t.Fatalf("got %v, want ErrUnreachable", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("took %v to fail", d)
	}
	if strings.Contains(err.Error(), "\n") {
		t.Errorf("multi-line error: %q", err)
	}
}

func TestPullUnauthorized(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusUnauthorized)
		io.WriteString(w, `{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}`)
	}))
	defer srv.Close()
	_, err := openStore(t).Pull(bg, strings.TrimPrefix(srv.URL, "http://")+"/private:1", image.PullOptions{})
	if !errors.Is(err, image.ErrUnauthorized) {
		t.Fatalf("got %v, want ErrUnauthorized", err)
	}
}

// A connection cut in the middle of a layer is retried.
func TestPullRetriesCutDownloads(t *testing.T) {
	reg := testregistry.StartInProcess(t)
	img, err := random.Image(2<<20, 1)
	if err != nil {
		t.Fatal(err)
	}
	push(t, reg.Host+"/flaky:1", img)
	layers, _ := img.Layers()
	layer, _ := layers[0].Digest()
	target, _ := url.Parse("http://" + reg.Host)
	proxy := httputil.NewSingleHostReverseProxy(target)
	var cuts atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasSuffix(r.URL.Path, "/blobs/"+layer.String()) && r.Method == http.MethodGet && cuts.Add(1) <= 2 {
			// Send half a body, then drop the connection.
			w.Header().Set("Content-Length", "2000000")
			w.WriteHeader(http.StatusOK)
			w.Write(make([]byte, 1000))
			w.(http.Flusher).Flush()
			conn, _, _ := w.(http.Hijacker).Hijack()
			conn.Close()
			return
		}
		proxy.ServeHTTP(w, r)
	}))
	defer srv.Close()
	s := openStore(t)
	got, err := s.Pull(bg, strings.TrimPrefix(srv.URL, "http://")+"/flaky:1", image.PullOptions{RetryDelay: 10 * time.Millisecond})
	if err != nil {
		t.Fatalf("pull through cuts: %v", err)
	}
	if got.Digest != digestOf(t, img) || cuts.Load() < 3 {
		t.Errorf("digest %s, %d blob requests", got.Digest, cuts.Load())
	}
	if left := scratchFiles(t, s); len(left) != 0 {
		t.Errorf("scratch files left: %v", left)
	}
}
