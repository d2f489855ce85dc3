package e2e

import (
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// configuredConfig is the OCI config of the configured:1 test image; the
// tests assert each field is honoured.
var configuredConfig = v1.Config{
	Entrypoint: []string{"/bin/sh", "-c"},
	Cmd:        []string{"echo default-cmd"},
	Env:        []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "FOO=from-image"},
	WorkingDir: "/home/user",
	User:       "user",
}

// writeConfiguredImage writes a `docker save` tarball of the busybox
// rootfs with configuredConfig.
func writeConfiguredImage(rootfsTar, out string) error {
	layer, err := tarball.LayerFromFile(rootfsTar)
	if err != nil {
		return err
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return err
	}
	cf = cf.DeepCopy()
	cf.Config = configuredConfig
	cf.OS, cf.Architecture = "linux", "amd64"
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		return err
	}
	tag, err := name.NewTag("configured:1")
	if err != nil {
		return err
	}
	return tarball.WriteToFile(out, tag, img)
}
