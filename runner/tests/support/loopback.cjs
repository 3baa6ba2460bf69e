// Preloaded into the MCP reference server (`node --require loopback.cjs …`) so that its HTTP
// listener binds 127.0.0.1 only: the server listens on every interface by default, and tests
// start nothing that other machines can reach.
const net = require("net");
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === "number" || (typeof args[0] === "string" && /^\d+$/.test(args[0]))) {
    const callback = args.find((a) => typeof a === "function");
    return callback ? listen.call(this, Number(args[0]), "127.0.0.1", callback) : listen.call(this, Number(args[0]), "127.0.0.1");
  }
  return listen.apply(this, args);
};
