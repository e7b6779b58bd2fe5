// Deployed by `wrangler deploy` to workerbundle dev; GREETING comes from wrangler.toml's [vars].
export default {
  async fetch(request, env) {
    const url = new URL(request.url);
    return new Response(`${env.GREETING}: ${request.method} ${url.pathname}\n`);
  },
};
