import addModule from "./add.wasm";
import { describe } from "./lib/describe.js";
import banner from "./banner.txt";
import legacy from "./lib/legacy.cjs";

const { add } = new WebAssembly.Instance(addModule).exports;

export default {
  async fetch(request, env) {
    const url = new URL(request.url);
    const body = {
      greeting: env.GREETING,
      answer: env.CONFIG.answer,
      sum: add(40, 2),
      banner: banner.trim(),
      legacy: legacy.shout("ok"),
      path: url.pathname,
      about: describe(env.CONFIG),
    };
    return Response.json(body);
  },
};
