// A local stand-in for the iframe-worker shim that Material's offline plugin would otherwise load
// from a CDN (the plugin adds none when a polyfill's path names "iframe-worker"; see mkdocs.yml).
// Pages opened from the file system (file://) cannot start a Web Worker, so the search worker runs
// in a hidden iframe instead: the worker's postMessage, message events and importScripts are
// bridged to the page. Served over HTTP, it does nothing.
(function () {
  "use strict";
  if (location.protocol !== "file:" || typeof window.Worker === "undefined") return;

  function FileWorker(url) {
    var target = document.createElement("div"); // an EventTarget the page listens on
    var iframe = document.createElement("iframe");
    var queue = [];
    var loaded = false;
    iframe.setAttribute("hidden", "");
    iframe.setAttribute("aria-hidden", "true");
    (document.body || document.documentElement).appendChild(iframe);
    var scope = iframe.contentWindow;
    var doc = iframe.contentDocument;
    var base = new URL(url, location.href).href; // importScripts resolves against the worker's URL

    function load(src) {
      return new Promise(function (resolve, reject) {
        var script = doc.createElement("script");
        script.src = new URL(src, base).href;
        script.onload = function () { resolve(); };
        script.onerror = function () { reject(new Error("cannot load " + src)); };
        doc.head.appendChild(script);
      });
    }

    // The worker's side: self.postMessage goes to the page, importScripts loads in order.
    scope.postMessage = function (data) {
      var event = new MessageEvent("message", { data: data });
      target.dispatchEvent(event);
      if (typeof api.onmessage === "function") api.onmessage(event);
    };
    scope.importScripts = function () {
      var urls = Array.prototype.slice.call(arguments);
      return urls.reduce(function (done, src) {
        return done.then(function () { return load(src); });
      }, Promise.resolve());
    };

    function deliver(data) {
      scope.dispatchEvent(new scope.MessageEvent("message", { data: data }));
    }

    var api = {
      onmessage: null,
      postMessage: function (data) {
        if (loaded) deliver(data);
        else queue.push(data);
      },
      addEventListener: function (type, fn, options) { target.addEventListener(type, fn, options); },
      removeEventListener: function (type, fn, options) { target.removeEventListener(type, fn, options); },
      dispatchEvent: function (event) { return target.dispatchEvent(event); },
      terminate: function () { iframe.remove(); },
    };

    load(base).then(function () {
      loaded = true;
      queue.splice(0).forEach(deliver);
    });
    return api;
  }

  window.Worker = FileWorker;
})();
