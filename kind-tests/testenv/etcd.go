// etcd.go owns the embedded etcd server: one member, data under DIR/etcd,
// client and peer listeners on 127.0.0.1 with ports chosen by the kernel,
// and its logger (stderr, same threshold as klog's).
package main

import (
	"errors"
	"net/url"
	"os"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

type etcdServer struct {
	*embed.Etcd
	logLevel zap.AtomicLevel
}

func startEtcd(dataDir, severity string) (*etcdServer, error) {
	loopback := url.URL{Scheme: "http", Host: "127.0.0.1:0"}

	level := zap.NewAtomicLevelAt(zapcore.ErrorLevel)
	switch severity {
	case "WARNING":
		level.SetLevel(zapcore.WarnLevel)
	case "INFO":
		level.SetLevel(zapcore.InfoLevel)
	}
	stderr := zapcore.Lock(os.Stderr)
	encoderConfig := zap.NewProductionEncoderConfig()
	encoderConfig.EncodeTime = zapcore.ISO8601TimeEncoder
	encoder := zapcore.NewConsoleEncoder(encoderConfig)
	logger := zap.New(zapcore.NewCore(encoder, stderr, level), zap.ErrorOutput(stderr)).Named("etcd")

	cfg := embed.NewConfig()
	cfg.Name = "testenv"
	cfg.Dir = dataDir
	cfg.ListenClientUrls = []url.URL{loopback}
	cfg.AdvertiseClientUrls = []url.URL{loopback}
	cfg.ListenPeerUrls = []url.URL{loopback}
	cfg.AdvertisePeerUrls = []url.URL{loopback}
	cfg.InitialCluster = cfg.Name + "=" + loopback.String()
	// The gateway would dial the configured client URL, port 0, and log
	// failures forever; nothing here uses etcd's JSON gateway.
	cfg.EnableGRPCGateway = false
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(logger)
	// Throw-away test data: skip fsync, keep fewer raft entries in memory.
	cfg.UnsafeNoFsync = true
	cfg.SnapshotCount = 5000

	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, err
	}
	s := &etcdServer{Etcd: e, logLevel: level}
	select {
	case <-e.Server.ReadyNotify():
		return s, nil
	case err := <-e.Err():
		s.close()
		return nil, err
	case <-time.After(30 * time.Second):
		s.close()
		return nil, errors.New("not ready after 30s")
	}
}

// close stops etcd. Its listeners report "use of closed network
// connection" at error level while closing; that is not worth printing.
func (s *etcdServer) close() {
	s.logLevel.SetLevel(zapcore.FatalLevel)
	s.Close()
}

// etcdClientURL is the address the kernel gave the client listener.
func etcdClientURL(e *etcdServer) string {
	return "http://" + e.Clients[0].Addr().String()
}
