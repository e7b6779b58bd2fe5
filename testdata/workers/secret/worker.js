// The secret's value reaches the worker only through the environment (here SECRET_API_KEY);
// the image holds its name, never its value.
export default {
  async fetch(request, env) {
    if (env.API_KEY == null) {
      return new Response("API_KEY is not set\n", { status: 500 });
    }
    return new Response(`mode=${env.MODE} key=${env.API_KEY}\n`);
  },
};
