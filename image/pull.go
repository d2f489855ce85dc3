package image

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"sync"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"matchlock.dev/matchlock/image/internal/archive"
	"matchlock.dev/matchlock/image/internal/flock"
	"matchlock.dev/matchlock/image/internal/index"
)

// PullOptions configure Pull. The zero value pulls for linux on this
// machine's architecture with the docker credential helpers.
type PullOptions struct {
	// Platform picks from a multi-arch image: "linux/arm64", "linux/arm/v7".
	Platform string
	// Progress, if set, is called (from several goroutines, one at a time)
	// as layers are fetched.
	Progress func(ProgressUpdate)
	// Keychain supplies credentials; authn.DefaultKeychain if nil
	// (~/.docker/config.json and credential helpers).
	Keychain authn.Keychain
	// Transport is the HTTP transport under auth and retries; a default
	// with bounded timeouts if nil.
	Transport http.RoundTripper
	// Attempts is how many times a transient failure is tried (default 3);
	// RetryDelay the first wait between them, doubling (default 500ms).
	Attempts   int
	RetryDelay time.Duration
	// Jobs is how many layers are fetched at once (default 3).
	Jobs int
}

// Limits of what a registry can make a pull read.
const (
	maxConfigSize = 16 << 20
)

// Pull fetches ref from its registry into the store and names it ref.
// Short names resolve as docker's do; a multi-arch index yields the image
// for opts.Platform. Blobs already in the store are not fetched again, and
// each blob is verified against its digest before it is stored. Errors wrap
// ErrNotFound, ErrUnauthorized, ErrUnreachable, ErrDigestMismatch or
// ErrNoSpace where they apply.
func (s *Store) Pull(ctx context.Context, ref string, opts PullOptions) (*Image, error) {
	img, err := s.pull(ctx, ref, opts)
	if err != nil {
		return nil, fmt.Errorf("pull %s: %w", ref, classify(err, s.root))
	}
	return img, nil
}

func (s *Store) pull(ctx context.Context, refStr string, opts PullOptions) (*Image, error) {
	ref, err := parseRef(refStr)
	if err != nil {
		return nil, err
	}
	plat, err := parsePlatform(opts.Platform, s.platform)
	if err != nil {
		return nil, err
	}
	if d, ok := ref.(name.Digest); ok {
		// A digest cannot move: an image already stored needs no registry.
		if done, err := s.pinnedPresent(d, opts); done || err != nil {
			if err != nil {
				return nil, err
			}
			return s.resolve(refStr)
		}
	}
	f, err := newFetcher(ctx, ref.Context(), opts)
	if err != nil {
		return nil, err
	}

	desc, err := remote.Get(ref, remote.WithTransport(f.rt), remote.WithContext(ctx))
	if err != nil {
		return nil, err
	}
	manifest, mDigest, mt := desc.Manifest, desc.Digest, desc.MediaType
	var indexDigest string
	switch mt {
	case types.OCIImageIndex, types.DockerManifestList:
		indexDigest = desc.Digest.String()
		chosen, err := pickPlatform(manifest, plat)
		if err != nil {
			return nil, err
		}
		d, err := remote.Get(ref.Context().Digest(chosen.Digest.String()), remote.WithTransport(f.rt), remote.WithContext(ctx))
		if err != nil {
			return nil, err
		}
		manifest, mDigest, mt = d.Manifest, d.Digest, d.MediaType
	case types.OCIManifestSchema1, types.DockerManifestSchema2:
	case types.DockerManifestSchema1, types.DockerManifestSchema1Signed:
		return nil, fmt.Errorf("%w: docker schema 1 manifests are not supported; push the image again with a current tool", ErrInvalidImage)
	default:
		return nil, fmt.Errorf("%w: unsupported manifest media type %q", ErrInvalidImage, mt)
	}
	if sha(manifest) != mDigest {
		return nil, fmt.Errorf("%w: manifest does not hash to %s", ErrDigestMismatch, mDigest)
	}
	m, err := v1.ParseManifest(bytes.NewReader(manifest))
	if err != nil {
		return nil, fmt.Errorf("%w: manifest: %v", ErrInvalidImage, err)
	}
	if m.Config.Size > maxConfigSize {
		return nil, fmt.Errorf("%w: config of %d bytes", ErrInvalidImage, m.Config.Size)
	}
	for _, l := range m.Layers {
		if !l.MediaType.IsDistributable() {
			return nil, fmt.Errorf("%w: layer %s is non-distributable (%s)", ErrInvalidImage, l.Digest, l.MediaType)
		}
	}

	lk, err := s.lockShared(ctx)
	if err != nil {
		return nil, err
	}
	defer lk.Release()

	if _, err := s.fetchBlob(ctx, f, m.Config, nil); err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	cfg, err := s.readBlob(m.Config.Digest, maxConfigSize)
	if err != nil {
		return nil, err
	}
	if err := s.fetchLayers(ctx, f, m.Layers, opts); err != nil {
		return nil, err
	}
	if _, _, err := s.blobs.Put(bytes.NewReader(manifest), mDigest, int64(len(manifest))); err != nil {
		return nil, err
	}

	layers := make([]archive.Layer, len(m.Layers))
	for i, l := range m.Layers {
		layers[i] = archive.Layer{MediaType: l.MediaType, Digest: l.Digest, Size: l.Size}
	}
	row, err := s.row(mDigest, mt, cfg, m.Config.Digest, layers)
	if err != nil {
		return nil, err
	}
	row.IndexDigest = indexDigest
	// A digest name keeps the digest it was pulled by, maybe an index's.
	n := index.Name{Repo: ref.Context().Name()}
	switch r := ref.(type) {
	case name.Tag:
		n.Tag = r.TagStr()
	case name.Digest:
		n.Pinned = r.DigestStr()
	}
	if err := s.db.Put(*row, []index.Name{n}); err != nil {
		return nil, err
	}
	return s.resolve(refStr)
}

// pinnedPresent names an already complete image d@digest without asking
// the registry; false if the image or one of its blobs is missing.
func (s *Store) pinnedPresent(d name.Digest, opts PullOptions) (bool, error) {
	row, err := s.byDigest(d.DigestStr())
	if err != nil {
		return false, nil
	}
	for _, dg := range append([]string{row.Digest, row.ConfigDigest}, layerDigests(row.Layers)...) {
		h, err := v1.NewHash(dg)
		if err != nil {
			return false, nil
		}
		if _, ok := s.blobs.Has(h); !ok {
			return false, nil
		}
	}
	row.LastUsed = s.now()
	if err := s.db.Put(*row, []index.Name{{Repo: d.Context().Name(), Pinned: d.DigestStr()}}); err != nil {
		return false, err
	}
	for i, l := range row.Layers {
		if opts.Progress != nil {
			opts.Progress(ProgressUpdate{Layer: l.Digest, Index: i, Count: len(row.Layers), Complete: l.Size, Total: l.Size, Cached: true, Done: true})
		}
	}
	return true, nil
}

func layerDigests(ls []index.Layer) []string {
	out := make([]string, len(ls))
	for i, l := range ls {
		out[i] = l.Digest
	}
	return out
}

func (s *Store) readBlob(h v1.Hash, limit int64) ([]byte, error) {
	f, err := s.blobs.Open(h)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, limit))
}

// pickPlatform chooses the manifest for plat from an index.
func pickPlatform(indexJSON []byte, plat v1.Platform) (v1.Descriptor, error) {
	idx, err := v1.ParseIndexManifest(bytes.NewReader(indexJSON))
	if err != nil {
		return v1.Descriptor{}, fmt.Errorf("%w: index: %v", ErrInvalidImage, err)
	}
	var have []string
	for _, d := range idx.Manifests {
		if d.Platform == nil {
			continue
		}
		if archive.PlatformMatches(*d.Platform, plat) {
			return d, nil
		}
		if d.Platform.OS != "unknown" {
			have = append(have, platformString(*d.Platform))
		}
	}
	return v1.Descriptor{}, fmt.Errorf("%w: no %s image in the index (it has %v); choose one with --platform", ErrNotFound, platformString(plat), have)
}

// fetchLayers fetches the layers not yet stored, opts.Jobs at a time.
func (s *Store) fetchLayers(ctx context.Context, f *fetcher, layers []v1.Descriptor, opts PullOptions) error {
	jobs := opts.Jobs
	if jobs <= 0 {
		jobs = 3
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		mu       sync.Mutex
		firstErr error
		wg       sync.WaitGroup
		sem      = make(chan struct{}, jobs)
	)
	report := func(u ProgressUpdate) {
		if opts.Progress == nil {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		opts.Progress(u)
	}
	for i, l := range layers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				return
			}
			defer func() { <-sem }()
			base := ProgressUpdate{Layer: l.Digest.String(), Index: i, Count: len(layers), Total: l.Size}
			progress := func(n int64) { u := base; u.Complete = n; report(u) }
			cached, err := s.fetchBlob(ctx, f, l, progress)
			if err != nil {
				mu.Lock()
				if firstErr == nil {
					firstErr = fmt.Errorf("layer %s: %w", l.Digest, err)
					cancel()
				}
				mu.Unlock()
				return
			}
			u := base
			u.Complete, u.Cached, u.Done = l.Size, cached, true
			report(u)
		}()
	}
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	return ctx.Err()
}

// fetchBlob stores blob d unless it is already there. Concurrent fetches of
// one blob, in any process, download it once: the others wait on its lock
// and find it stored. It reports whether the blob was already there.
func (s *Store) fetchBlob(ctx context.Context, f *fetcher, d v1.Descriptor, progress func(int64)) (cached bool, err error) {
	if size, ok := s.blobs.Has(d.Digest); ok && size == d.Size {
		return true, nil
	}
	if d.Digest.Algorithm != "sha256" || len(d.Digest.Hex) != 64 {
		return false, fmt.Errorf("%w: unsupported digest %q", ErrInvalidImage, d.Digest)
	}
	lk, err := flock.Acquire(ctx, s.path("locks", "blob-"+d.Digest.Hex+".lock"), flock.Exclusive)
	if err != nil {
		return false, err
	}
	defer lk.Release()
	if size, ok := s.blobs.Has(d.Digest); ok && size == d.Size {
		return true, nil
	}
	delay := f.retryDelay
	for attempt := 1; ; attempt++ {
		err = f.download(ctx, d, func(r io.Reader) error {
			_, _, err := s.blobs.Put(&progressReader{r: r, report: progress}, d.Digest, d.Size)
			return err
		})
		if err == nil || attempt >= f.attempts || !transient(err) || ctx.Err() != nil {
			return false, err
		}
		select {
		case <-ctx.Done():
			return false, ctx.Err()
		case <-time.After(delay):
		}
		delay *= 2
	}
}

// fetcher fetches from one repository over an authenticated transport.
type fetcher struct {
	repo       name.Repository
	rt         http.RoundTripper
	client     *http.Client
	attempts   int
	retryDelay time.Duration
}

func newFetcher(ctx context.Context, repo name.Repository, opts PullOptions) (*fetcher, error) {
	kc := opts.Keychain
	if kc == nil {
		kc = authn.DefaultKeychain
	}
	auth, err := authn.Resolve(ctx, kc, repo)
	if err != nil {
		return nil, fmt.Errorf("%w: credentials for %s: %v", ErrUnauthorized, repo.RegistryStr(), err)
	}
	f := &fetcher{repo: repo, attempts: opts.Attempts, retryDelay: opts.RetryDelay}
	if f.attempts <= 0 {
		f.attempts = 3
	}
	if f.retryDelay <= 0 {
		f.retryDelay = 500 * time.Millisecond
	}
	base := opts.Transport
	if base == nil {
		base = defaultTransport()
	}
	retrying := transport.NewRetry(base,
		transport.WithRetryBackoff(transport.Backoff{Duration: f.retryDelay, Factor: 2, Jitter: 0.1, Steps: f.attempts}),
		transport.WithRetryPredicate(transient),
		transport.WithRetryStatusCodes(http.StatusRequestTimeout, http.StatusTooManyRequests, http.StatusInternalServerError,
			http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout))
	f.rt, err = transport.NewWithContext(ctx, repo.Registry, auth, retrying, []string{repo.Scope(transport.PullScope)})
	if err != nil {
		return nil, err
	}
	f.client = &http.Client{Transport: f.rt}
	return f, nil
}

// defaultTransport bounds each step, so that a dead registry fails in
// seconds rather than minutes.
func defaultTransport() http.RoundTripper {
	return &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		ForceAttemptHTTP2:     true,
		MaxIdleConnsPerHost:   16,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ResponseHeaderTimeout: 60 * time.Second,
		ExpectContinueTimeout: time.Second,
	}
}

// download GETs blob d and hands its body to store.
func (f *fetcher) download(ctx context.Context, d v1.Descriptor, store func(io.Reader) error) error {
	u := url.URL{Scheme: f.repo.Scheme(), Host: f.repo.RegistryStr(), Path: fmt.Sprintf("/v2/%s/blobs/%s", f.repo.RepositoryStr(), d.Digest)}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return err
	}
	resp, err := f.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if err := transport.CheckError(resp, http.StatusOK); err != nil {
		return err
	}
	return store(resp.Body)
}

// progressReader reports bytes read, at most every 64 KiB.
type progressReader struct {
	r           io.Reader
	report      func(int64)
	n, reported int64
}

func (p *progressReader) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	p.n += int64(n)
	if p.report != nil && (p.n-p.reported >= 64<<10 || err != nil) {
		p.reported = p.n
		p.report(p.n)
	}
	return n, err
}

// transient says whether a failure may go away when tried again: a reset
// connection, a cut body, a timeout. A refused connection, a bad digest, a
// 4xx or a full disk will not.
func transient(err error) bool {
	if err == nil || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return false
	}
	if errors.Is(err, ErrDigestMismatch) || errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.ECONNREFUSED) {
		return false
	}
	var te *transport.Error
	if errors.As(err, &te) {
		return te.Temporary()
	}
	if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) {
		return true
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// classify wraps err with the sentinel that says what kind of failure it is.
func classify(err error, root string) error {
	var te *transport.Error
	switch {
	case errors.Is(err, ErrNotFound), errors.Is(err, ErrUnauthorized), errors.Is(err, ErrUnreachable),
		errors.Is(err, ErrDigestMismatch), errors.Is(err, ErrNoSpace), errors.Is(err, ErrInvalidRef),
		errors.Is(err, ErrInvalidImage), errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return err
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		return diskErr(err, root)
	case errors.As(err, &te):
		for _, d := range te.Errors {
			switch d.Code {
			case transport.ManifestUnknownErrorCode, transport.NameUnknownErrorCode, transport.BlobUnknownErrorCode:
				return fmt.Errorf("%w: %w", ErrNotFound, err)
			case transport.UnauthorizedErrorCode, transport.DeniedErrorCode:
				return fmt.Errorf("%w (log in with docker login, or check the name): %w", ErrUnauthorized, err)
			case transport.DigestInvalidErrorCode:
				return fmt.Errorf("%w: %w", ErrDigestMismatch, err)
			}
		}
		switch te.StatusCode {
		case http.StatusNotFound:
			return fmt.Errorf("%w: %w", ErrNotFound, err)
		case http.StatusUnauthorized, http.StatusForbidden:
			return fmt.Errorf("%w (log in with docker login, or check the name): %w", ErrUnauthorized, err)
		}
		return err
	}
	var (
		opErr   *net.OpError
		dnsErr  *net.DNSError
		certErr *tls.CertificateVerificationError
		recErr  tls.RecordHeaderError
	)
	if errors.As(err, &opErr) || errors.As(err, &dnsErr) || errors.As(err, &certErr) || errors.As(err, &recErr) ||
		errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.EHOSTUNREACH) || errors.Is(err, syscall.ENETUNREACH) {
		return fmt.Errorf("%w: %w", ErrUnreachable, err)
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return fmt.Errorf("%w: %w", ErrUnreachable, err)
	}
	return err
}
