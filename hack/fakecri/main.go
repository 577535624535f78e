// Command fakecri serves the upstream fake CRI runtime and image services
// (k8s.io/cri-client/pkg/fake, backed by k8s.io/cri-api's testing fakes) on
// a unix socket, so that a real kubelet can run on a machine without a
// container runtime. Sandboxes and containers exist only in its memory: the
// kubelet sees them created, started and running; nothing is executed.
//
//	fakecri --listen unix:///tmp/fake.sock
package main

import (
	"flag"
	"log"
	"os"
	"os/signal"
	"syscall"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	"k8s.io/cri-client/pkg/fake"
)

func main() {
	endpoint := flag.String("listen", "unix:///run/fakecri/fakecri.sock", "the CRI endpoint to serve (unix:///path)")
	imageFs := flag.String("image-fs", "/", "mountpoint reported as the image and container filesystem")
	flag.Parse()

	f := fake.NewFakeRemoteRuntime()
	// The kubelet asks the runtime for its cgroup driver; answer as it is
	// configured (cgroupfs) rather than with an empty reply.
	f.RuntimeService.FakeLinuxConfiguration = &runtimeapi.LinuxRuntimeConfiguration{
		CgroupDriver: runtimeapi.CgroupDriver_CGROUPFS,
	}
	fsUsage := []*runtimeapi.FilesystemUsage{{
		Timestamp:  1,
		FsId:       &runtimeapi.FilesystemIdentifier{Mountpoint: *imageFs},
		UsedBytes:  &runtimeapi.UInt64Value{Value: 0},
		InodesUsed: &runtimeapi.UInt64Value{Value: 0},
	}}
	// The kubelet rejects a pulled image whose size is 0 ("Id or size of
	// image ... is not set"), the fake's default.
	f.ImageService.SetFakeImageSize(1 << 20)
	f.ImageService.FakeFilesystemUsage = fsUsage
	f.ImageService.FakeContainerFilesystemUsage = fsUsage
	if err := f.Start(*endpoint); err != nil {
		log.Fatalf("fakecri: %v", err)
	}
	log.Printf("fakecri: serving the fake CRI runtime and image services on %s", *endpoint)

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	f.Stop()
}
